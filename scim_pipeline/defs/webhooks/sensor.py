"""The webhook sensor: turns events waiting in the receiver's inbox into incremental runs, one per organization.

It reads the inbox (SQLite or PostgreSQL, never DuckDB) past its cursor, adds partitions for organizations it has
not seen, and asks for a ``directory_events`` run (the sync's assets in ``events`` mode) for each organization with
new events. The run applies every event of its organization that is not applied yet, then re-derives memberships,
roles and change sets and delivers them.

An organization id names a partition and run keys, so only a Scalekit organization id does: events whose
``organization_id`` is anything else go to the ``quarantine_webhook_events`` job, which records them as invalid.

A run can fail (the warehouse stayed locked, the process was killed and reaped): its events stay in the inbox and
the cursor has moved past them. So each tick also compares the applied marks the runs leave in the inbox with the
events: an organization (or the quarantine) whose events stay unapplied for ``SCIM_PIPELINE_EVENTS_RETRY_S``, with
no run of it in flight and none ended within that time, is asked for again under a new run key.
"""


import time
from collections import defaultdict
from datetime import datetime

import dagster as dg

from scim_pipeline.config import number_setting, settings
from scim_pipeline.defs.jobs import IN_FLIGHT, TRIGGER_TAG, directory_events_job, directory_sync_job
from scim_pipeline.defs.partitions import organizations_partitions
from scim_pipeline.defs.webhooks.quarantine import quarantine_webhook_events
from scim_pipeline.receiver.inbox import Inbox
from scim_pipeline.scalekit import ids
from scim_pipeline.warehouse.events import QUARANTINE

MAX_EVENTS_PER_TICK = 20_000
MAX_RETRIES_PER_TICK = 50  # each costs two queries of the run storage
RETRY_VAR = "SCIM_PIPELINE_EVENTS_RETRY_S"
DEFAULT_RETRY_S = 60.0  # far longer than an incremental run takes to start, short beside a nightly reconciliation


def events_run_config(after_seq: int, up_to_seq: int) -> dict:
    return {"ops": {"directory_snapshot": {"config": {"mode": "events", "after_seq": after_seq, "up_to_seq": up_to_seq}}}}


def quarantine_run_config(after_seq: int, up_to_seq: int) -> dict:
    return {"ops": {"record_unroutable_events": {"config": {"after_seq": after_seq, "up_to_seq": up_to_seq}}}}


def retry_after_s() -> float:
    """Seconds events may stay unapplied before their organization is asked for again (SCIM_PIPELINE_EVENTS_RETRY_S)."""
    return number_setting(RETRY_VAR, DEFAULT_RETRY_S, "a number of seconds of at least 0", lambda s: s >= 0)


def route_of(organization_id: str | None) -> str:
    """Which run applies an event: its organization's, or the quarantine for one that names none."""
    return organization_id if ids.ORGANIZATION.matches(organization_id) else QUARANTINE


@dg.sensor(
    jobs=[directory_events_job, directory_sync_job, quarantine_webhook_events],
    minimum_interval_seconds=1,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Launches an incremental run for each organization with new webhook events in the inbox, and again "
    "for one whose events a failed run left unapplied.",
)
def webhook_events_sensor(context: dg.SensorEvaluationContext):
    after = int(context.cursor or 0)
    inbox = Inbox(settings().inbox_location)
    marks = inbox.applied_marks()
    events = inbox.read_after(after, limit=MAX_EVENTS_PER_TICK)
    up_to = events[-1].seq if events else after
    per_route: dict[str, int] = defaultdict(int)
    for event in events:
        per_route[route_of(event.organization_id)] += 1
    unroutable = per_route.pop(QUARANTINE, 0)
    known = set(context.instance.get_dynamic_partitions(organizations_partitions.name))
    new = sorted(set(per_route) - known)
    # An organization seen for the first time gets a full sync: its events alone are not its directory.
    requests = [
        dg.RunRequest(
            job_name=directory_events_job.name,
            partition_key=org,
            run_key=f"events:{org}:{up_to}",
            run_config=events_run_config(marks.get(org, 0), up_to),
            tags={TRIGGER_TAG: "webhook", "scim_pipeline/events": str(n)},
        )
        if org not in new else
        dg.RunRequest(job_name=directory_sync_job.name, partition_key=org, run_key=f"first-sync:{org}",
                      tags={TRIGGER_TAG: "discovery"})
        for org, n in sorted(per_route.items())
    ]
    if unroutable:
        context.log.warning(f"{unroutable} event(s) up to seq {up_to} name no organization: recorded as invalid")
        requests.append(quarantine_request(marks.get(QUARANTINE, 0), up_to, f"quarantine:{up_to}", unroutable))
    if events:
        context.log.info(f"{len(events)} events up to seq {up_to} for {len(per_route)} organization(s)")
    # Events of earlier ticks only: those of this tick have just been asked for.
    asked = set(per_route) | ({QUARANTINE} if unroutable else set())
    requests += retry_requests(context, inbox, marks, after, known, asked)
    if not requests and not events:
        return dg.SkipReason("no new webhook events")
    return dg.SensorResult(
        run_requests=requests,
        cursor=str(up_to),
        dynamic_partitions_requests=[organizations_partitions.build_add_request(new)] if new else [],
    )


def quarantine_request(after_seq: int, up_to_seq: int, run_key: str, events: int | None = None) -> dg.RunRequest:
    return dg.RunRequest(job_name=quarantine_webhook_events.name, run_key=run_key,
                         run_config=quarantine_run_config(after_seq, up_to_seq),
                         tags={TRIGGER_TAG: "webhook", **({"scim_pipeline/events": str(events)}
                                                                      if events is not None else {})})


def retry_requests(context: dg.SensorEvaluationContext, inbox: Inbox, marks: dict[str, int], up_to: int,
                   known: set[str], asked: set[str]) -> list[dg.RunRequest]:
    """A run for each route whose events up to ``up_to`` stay unapplied past the grace period with no run of it in
    flight or recently ended. The inbox is read first (cheap, by index); Dagster's runs only for those routes."""
    if not up_to:
        return []
    grace = retry_after_s()
    # Per route, the oldest event not applied: a route's events are its organization's, or all unroutable ones.
    oldest: dict[str, tuple[int, str]] = {}
    values = inbox.organizations()
    firsts = inbox.first_unapplied({v: marks.get(route_of(v), 0) for v in values}, up_to)
    for value, (seq, received_at) in firsts.items():
        route = route_of(value)
        if route not in asked and (route == QUARANTINE or route in known):
            oldest[route] = min(oldest.get(route, (seq, received_at)), (seq, received_at))
    now = time.time()
    due = sorted((first, route) for route, first in oldest.items() if _age_s(first[1], now) >= grace)
    requests = []
    for (seq, _), route in due[:MAX_RETRIES_PER_TICK]:
        # Any run of the organization's partition counts (a full sync, a provisioning run): it holds the warehouse.
        runs = ({"job_name": quarantine_webhook_events.name} if route == QUARANTINE
                else {"tags": {"dagster/partition": route}})
        instance = context.instance
        if instance.get_run_records(dg.RunsFilter(**runs, statuses=IN_FLIGHT), limit=1):
            continue  # that run will apply them
        latest = instance.get_run_records(dg.RunsFilter(**runs), limit=1)
        # A run that never started has no end time: its last update stands for it.
        if latest and now - (latest[0].end_time or latest[0].update_timestamp.timestamp()) < grace:
            continue  # ended moments ago: let its marks land, and do not retry a failing warehouse at once
        # A new key for each attempt: the run it follows names it.
        run_key = f"retry:{route}:{up_to}:{latest[0].dagster_run.run_id if latest else 'none'}"
        # Routine after an organization's first sync (it applies no events); otherwise a run failed or was lost.
        context.log.info(f"{route}: inbox events from seq {seq} are not applied and no run of them is in flight: "
                         "asking again")
        if route == QUARANTINE:
            requests.append(quarantine_request(marks.get(QUARANTINE, 0), up_to, run_key))
        else:
            requests.append(dg.RunRequest(job_name=directory_events_job.name, partition_key=route, run_key=run_key,
                                          run_config=events_run_config(marks.get(route, 0), up_to),
                                          tags={TRIGGER_TAG: "webhook-retry"}))
    return requests


def _age_s(received_at: str, now: float) -> float:
    try:
        return now - datetime.fromisoformat(received_at).timestamp()
    except (TypeError, ValueError):
        return float("inf")  # an unreadable time: not a reason to wait
