"""How directory syncs start by themselves: the discovery sensor and the reconciliation schedule."""


import hashlib
import json
import os

import dagster as dg

from scim_pipeline.config import ConfigError, number_setting
from scim_pipeline.defs.jobs import IN_FLIGHT, TRIGGER_TAG, directory_catalog_job, directory_sync_job
from scim_pipeline.defs.partitions import organizations_partitions
from scim_pipeline.defs.resources import ScalekitResource
from scim_pipeline.scalekit import ids
from scim_pipeline.scalekit.directory_api import ScalekitError

RECONCILE_CRON_VAR = "SCIM_PIPELINE_RECONCILE_CRON"
DEFAULT_RECONCILE_CRON = "0 3 * * *"  # daily, at night
RUN_BATCH_VAR = "SCIM_PIPELINE_ORGS_PER_RUN"
DEFAULT_ORGS_PER_RUN = 1000  # a run costs seconds of bookkeeping, and holds the warehouse only while it writes

RECONCILIATION = "reconciliation"  # the trigger tag of the schedule's runs
RECONCILE_NICE_VAR = "SCIM_PIPELINE_RECONCILE_NICE"
DEFAULT_RECONCILE_NICE = 10

RANGE_START = "dagster/asset_partition_range_start"
RANGE_END = "dagster/asset_partition_range_end"


def partition_ranges(keys: list[str], wanted: set[str] | None, per_run: int) -> list[tuple[str, str]]:
    """(first, last) of consecutive runs of the wanted partition keys, at most ``per_run`` each: what one run covers
    under the assets' single-run backfill policy (a range follows the partitions' order, so it cannot skip one)."""
    ranges, chunk = [], []
    for key in keys:
        if wanted is None or key in wanted:
            chunk.append(key)
            if len(chunk) < per_run:
                continue
        if chunk:
            ranges.append((chunk[0], chunk[-1]))
        chunk = []
    if chunk:
        ranges.append((chunk[0], chunk[-1]))
    return ranges


def orgs_per_run() -> int:
    """Organizations per full-sync run, from SCIM_PIPELINE_ORGS_PER_RUN (a whole number, at least 1)."""
    return number_setting(RUN_BATCH_VAR, DEFAULT_ORGS_PER_RUN, "a whole number of at least 1", lambda n: n >= 1,
                          parse=int)


def reconcile_nice() -> int:
    """The niceness of a reconciliation's listing threads (0-19), from SCIM_PIPELINE_RECONCILE_NICE."""
    return number_setting(RECONCILE_NICE_VAR, DEFAULT_RECONCILE_NICE, "a whole number from 0 to 19",
                          lambda n: 0 <= n <= 19, parse=int)


def listing_nice(run: dg.DagsterRun) -> int:
    """The CPU niceness of a run's listing threads: ``SCIM_PIPELINE_RECONCILE_NICE`` for a reconciliation, else 0.

    A reconciliation is background work: re-reading every directory takes minutes of CPU, and on a host that also
    runs the webhook path's runs, those waited for a core behind it. Its listing threads (the bulk of that CPU)
    give way: at niceness 10 the kernel gives a webhook run about ten times their share while both want a core,
    and them all of it otherwise, so the reconciliation is never starved. Its writes keep their priority: they hold
    the warehouse, which a webhook run may be waiting for."""
    return reconcile_nice() if run.tags.get(TRIGGER_TAG) == RECONCILIATION else 0


def range_tags(first: str, last: str) -> dict[str, str]:
    return {RANGE_START: first, RANGE_END: last}


@dg.sensor(
    jobs=[directory_catalog_job, directory_sync_job],
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Lists Scalekit's organizations and directories; adds a partition for each new organization with an "
    "enabled directory and launches its first sync; refreshes the catalogue when it changed; syncs an organization "
    "whose directory was enabled since, and one Scalekit no longer lists (its users are deprovisioned, through the "
    "guard).",
)
def discover_organizations(context: dg.SensorEvaluationContext, scalekit: ScalekitResource):
    # The partitions before the listing: one added meanwhile (by the webhook sensor) is not taken for deleted.
    known = set(context.instance.get_dynamic_partitions(organizations_partitions.name))
    try:
        api = scalekit.api()
        catalogue = []
        for org in api.organizations():
            if not ids.ORGANIZATION.matches(org["organization_id"]):  # it would name a partition and a run key
                context.log.warning(f"skipped: {ids.shown(org['organization_id'])} is not an organization id")
                continue
            dirs = api.directories(org["organization_id"])
            catalogue.append((org["organization_id"], org["display_name"],
                              sorted((d["directory_id"], d["enabled"]) for d in dirs)))
    except (ScalekitError, ConfigError) as exc:
        return dg.SkipReason(f"Scalekit not readable: {exc}")
    enabled = {org: [d for d, on in dirs if on] for org, _, dirs in catalogue if any(on for _, on in dirs)}
    new = [org for org in enabled if org not in known]
    digest = hashlib.sha256(json.dumps(catalogue).encode()).hexdigest()
    last_digest, last_enabled = _read_cursor(context.cursor)
    requests = []
    if digest != last_digest:
        requests.append(dg.RunRequest(job_name="directory_catalog", run_key=f"catalog:{digest[:16]}"))
        # Scalekit sends no webhook when an organization is deleted: a partition it no longer lists gets a full sync,
        # which finds it gone and deprovisions its users through the guard (once per catalogue that lacks it).
        requests += [_sync(org, f"gone:{org}:{digest[:16]}", "organization deleted")
                     for org in sorted(known - {org for org, _, _ in catalogue})]
        # A known organization whose directory was enabled since the last tick (connected after its partition was
        # added, or switched back on) is listed whole: whatever it holds may never have come as a webhook event.
        if last_enabled is not None:
            requests += [_sync(org, f"enabled:{org}:{digest[:16]}", "directory enabled")
                         for org, dirs in enabled.items()
                         if org in known and set(dirs) - set(last_enabled.get(org, []))]
    requests += [_sync(org, f"first-sync:{org}", "discovery") for org in new]
    return dg.SensorResult(
        run_requests=requests,
        cursor=json.dumps({"digest": digest, "enabled": enabled}, separators=(",", ":")),
        dynamic_partitions_requests=[organizations_partitions.build_add_request(new)] if new else [],
    )


def _sync(org: str, run_key: str, trigger: str) -> dg.RunRequest:
    return dg.RunRequest(job_name="directory_sync", partition_key=org, run_key=run_key,
                         tags={TRIGGER_TAG: trigger})


def _read_cursor(cursor: str | None) -> tuple[str | None, dict[str, list[str]] | None]:
    """The discovery cursor: the catalogue's digest and each organization's enabled directories at the last tick.
    A cursor of an older version (the digest alone) gives no directories: nothing counts as newly enabled."""
    try:
        value = json.loads(cursor or "")
        return value["digest"], value["enabled"]
    except (ValueError, TypeError, KeyError):
        return cursor, None


@dg.schedule(
    job=directory_sync_job,
    cron_schedule=os.environ.get(RECONCILE_CRON_VAR, DEFAULT_RECONCILE_CRON),
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Full reconciliation: re-reads every organization's directory and repairs whatever webhooks missed. "
    f"Cron from {RECONCILE_CRON_VAR} (default daily at 03:00 UTC).",
)
def reconciliation_schedule(context: dg.ScheduleEvaluationContext):
    keys = list(context.instance.get_dynamic_partitions(organizations_partitions.name))
    if not keys:
        return dg.SkipReason("no organizations yet: the discovery sensor adds them")
    # A reconciliation that outlasts the schedule's interval is not joined by a second one re-reading the same
    # directories: both would run slower, then the next would join them.
    unfinished = context.instance.get_run_records(
        dg.RunsFilter(job_name=directory_sync_job.name, tags={TRIGGER_TAG: RECONCILIATION},
                      statuses=IN_FLIGHT), limit=1)
    if unfinished:
        return dg.SkipReason(f"the last reconciliation is still running (run {unfinished[0].dagster_run.run_id})")
    per_run = orgs_per_run()
    stamp = context.scheduled_execution_time.isoformat() if context.scheduled_execution_time else "now"
    return [
        dg.RunRequest(run_key=f"reconcile:{stamp}:{first}..{last}",
                      tags={**range_tags(first, last), TRIGGER_TAG: RECONCILIATION})
        for first, last in partition_ranges(keys, None, per_run)
    ]
