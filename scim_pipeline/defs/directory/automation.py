"""How directory syncs start by themselves: the discovery sensor and the reconciliation schedule."""


import hashlib
import json
import os

import dagster as dg

from scim_pipeline.config import ConfigError
from scim_pipeline.defs.jobs import directory_catalog_job, directory_sync_job
from scim_pipeline.defs.partitions import organizations_partitions
from scim_pipeline.resources.scalekit import ScalekitError, ScalekitResource

RECONCILE_CRON_VAR = "SCIM_PIPELINE_RECONCILE_CRON"
DEFAULT_RECONCILE_CRON = "0 3 * * *"  # daily, at night
RUN_BATCH_VAR = "SCIM_PIPELINE_ORGS_PER_RUN"
DEFAULT_ORGS_PER_RUN = 50  # a run lists its organizations concurrently; a thousand organizations are 20 runs

RANGE_START = "dagster/asset_partition_range_start"
RANGE_END = "dagster/asset_partition_range_end"


def partition_range_requests(keys: list[str], per_run: int, run_key_prefix: str | None, tags: dict) -> list[dg.RunRequest]:
    """Consecutive chunks of partition keys, each one run (the assets' single-run backfill policy)."""
    requests = []
    for i in range(0, len(keys), per_run):
        chunk = keys[i : i + per_run]
        requests.append(dg.RunRequest(
            run_key=f"{run_key_prefix}:{chunk[0]}..{chunk[-1]}" if run_key_prefix else None,
            tags={**tags, RANGE_START: chunk[0], RANGE_END: chunk[-1]},
        ))
    return requests


@dg.sensor(
    jobs=[directory_catalog_job, directory_sync_job],
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Lists Scalekit's organizations and directories; adds a partition for each new organization with an "
    "enabled directory and launches its first sync; refreshes the catalogue when it changed.",
)
def discover_organizations(context: dg.SensorEvaluationContext, scalekit: ScalekitResource):
    try:
        api = scalekit.api()
        catalogue = []
        for org in api.organizations():
            dirs = api.directories(org["organization_id"])
            catalogue.append((org["organization_id"], org["display_name"],
                              sorted((d["directory_id"], d["enabled"]) for d in dirs)))
    except (ScalekitError, ConfigError) as exc:
        return dg.SkipReason(f"Scalekit not readable: {exc}")
    known = set(context.instance.get_dynamic_partitions(organizations_partitions.name))
    new = [org for org, _, dirs in catalogue if org not in known and any(enabled for _, enabled in dirs)]
    digest = hashlib.sha256(json.dumps(catalogue).encode()).hexdigest()
    requests = []
    if digest != context.cursor:
        requests.append(dg.RunRequest(job_name="directory_catalog", run_key=f"catalog:{digest[:16]}"))
    requests += [
        dg.RunRequest(job_name="directory_sync", partition_key=org, run_key=f"first-sync:{org}",
                      tags={"scim_pipeline/trigger": "discovery"})
        for org in new
    ]
    return dg.SensorResult(
        run_requests=requests,
        cursor=digest,
        dynamic_partitions_requests=[organizations_partitions.build_add_request(new)] if new else [],
    )


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
    per_run = int(os.environ.get(RUN_BATCH_VAR, DEFAULT_ORGS_PER_RUN))
    stamp = context.scheduled_execution_time.isoformat() if context.scheduled_execution_time else "now"
    return partition_range_requests(keys, per_run, f"reconcile:{stamp}", {"scim_pipeline/trigger": "reconciliation"})
