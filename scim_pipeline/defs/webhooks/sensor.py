"""The webhook sensor: turns events waiting in the receiver's inbox into incremental runs, one per organization.

It reads the inbox (SQLite, never DuckDB) past its cursor, adds partitions for organizations it has not seen, and
asks for a ``directory_events`` run (the sync's assets in ``events`` mode) for each organization with new events. The run applies them,
then re-derives memberships, roles and change sets; the delivery sensor then pushes the changes.
"""


from collections import defaultdict

import dagster as dg

from scim_pipeline.config import settings
from scim_pipeline.defs.jobs import directory_events_job, directory_sync_job
from scim_pipeline.defs.partitions import organizations_partitions
from scim_pipeline.receiver.inbox import Inbox

MAX_EVENTS_PER_TICK = 20_000


def events_run_config(after_seq: int, up_to_seq: int) -> dict:
    return {"ops": {"directory_snapshot": {"config": {"mode": "events", "after_seq": after_seq, "up_to_seq": up_to_seq}}}}


@dg.sensor(
    jobs=[directory_events_job, directory_sync_job],
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
    for event in events:
        if event.organization_id:
            per_org[event.organization_id] += 1
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
    context.log.info(f"{len(events)} events up to seq {up_to} for {len(per_org)} organization(s)")
    return dg.SensorResult(
        run_requests=requests,
        cursor=str(up_to),
        dynamic_partitions_requests=[organizations_partitions.build_add_request(new)] if new else [],
    )
