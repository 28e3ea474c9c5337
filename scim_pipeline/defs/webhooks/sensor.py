"""The webhook sensor: turns events waiting in the receiver's inbox into incremental runs, one per organization.

It reads the inbox (SQLite, never DuckDB) past its cursor, adds partitions for organizations it has not seen, and
asks for a ``directory_events`` run (the sync's assets in ``events`` mode) for each organization with new events. The run applies them,
then re-derives memberships, roles and change sets; the delivery sensor then pushes the changes.

An organization id names a partition and run keys, so only a Scalekit organization id does: events whose
``organization_id`` is anything else go to the ``quarantine_webhook_events`` job, which records them as invalid.
"""


from collections import defaultdict

import dagster as dg

from scim_pipeline.config import settings
from scim_pipeline.defs.jobs import directory_events_job, directory_sync_job
from scim_pipeline.defs.partitions import organizations_partitions
from scim_pipeline.defs.webhooks.quarantine import quarantine_webhook_events
from scim_pipeline.receiver.inbox import Inbox
from scim_pipeline.scalekit import ids

MAX_EVENTS_PER_TICK = 20_000


def events_run_config(after_seq: int, up_to_seq: int) -> dict:
    return {"ops": {"directory_snapshot": {"config": {"mode": "events", "after_seq": after_seq, "up_to_seq": up_to_seq}}}}


def quarantine_run_config(after_seq: int, up_to_seq: int) -> dict:
    return {"ops": {"record_unroutable_events": {"config": {"after_seq": after_seq, "up_to_seq": up_to_seq}}}}


@dg.sensor(
    jobs=[directory_events_job, directory_sync_job, quarantine_webhook_events],
    minimum_interval_seconds=1,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Launches an incremental run for each organization with new webhook events in the inbox.",
)
def webhook_events_sensor(context: dg.SensorEvaluationContext):
    after = int(context.cursor or 0)
    events = Inbox(settings().inbox_path).read_after(after, limit=MAX_EVENTS_PER_TICK)
    if not events:
        return dg.SkipReason("no new webhook events")
    up_to = events[-1].seq
    per_org: dict[str, int] = defaultdict(int)
    unroutable = 0
    for event in events:
        if ids.ORGANIZATION.matches(event.organization_id):
            per_org[event.organization_id] += 1
        else:
            unroutable += 1
    known = set(context.instance.get_dynamic_partitions(organizations_partitions.name))
    new = sorted(set(per_org) - known)
    # An organization seen for the first time gets a full sync: its events alone are not its directory.
    requests = [
        dg.RunRequest(
            job_name=directory_events_job.name,
            partition_key=org,
            run_key=f"events:{org}:{up_to}",
            run_config=events_run_config(after, up_to),
            tags={"scim_pipeline/trigger": "webhook", "scim_pipeline/events": str(n)},
        )
        if org not in new else
        dg.RunRequest(job_name=directory_sync_job.name, partition_key=org, run_key=f"first-sync:{org}",
                      tags={"scim_pipeline/trigger": "discovery"})
        for org, n in sorted(per_org.items())
    ]
    if unroutable:
        context.log.warning(f"{unroutable} event(s) up to seq {up_to} name no organization: recorded as invalid")
        requests.append(dg.RunRequest(
            job_name=quarantine_webhook_events.name, run_key=f"quarantine:{up_to}",
            run_config=quarantine_run_config(after, up_to),
            tags={"scim_pipeline/trigger": "webhook", "scim_pipeline/events": str(unroutable)},
        ))
    context.log.info(f"{len(events)} events up to seq {up_to} for {len(per_org)} organization(s)")
    return dg.SensorResult(
        run_requests=requests,
        cursor=str(up_to),
        dynamic_partitions_requests=[organizations_partitions.build_add_request(new)] if new else [],
    )
