"""The jobs: the catalogue, the full sync, the incremental (webhook) sync, and delivery (in delivery.py)."""

import dagster as dg

TRIGGER_TAG = "scim_pipeline/trigger"  # what asked for a run: webhook, discovery, reconciliation, ...
# A run in one of these may still write: a sensor or schedule that must not ask twice waits for it.
IN_FLIGHT = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
             dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING, dg.DagsterRunStatus.MANAGED]

SYNCED_ASSETS = dg.AssetSelection.assets(
    "directory_users", "directory_groups", "group_memberships", "role_assignments", "directory_users_history",
    "change_sets",
)

directory_catalog_job = dg.define_asset_job(
    "directory_catalog", selection=["organizations", "directories"], executor_def=dg.in_process_executor,
    description="List Scalekit's organizations and directories into the warehouse.",
)

directory_sync_job = dg.define_asset_job(
    "directory_sync",
    selection=SYNCED_ASSETS,
    executor_def=dg.in_process_executor,  # a step subprocess costs more than the work of an incremental run
    description="Sync organizations (a full snapshot from Scalekit) and compute their change sets; data checks run.",
)

# The webhook path: the same assets in `events` mode, then delivery of the organization's changes in the same run;
# no data checks (full runs and the reconciliation run them). Each step and each run start-up costs seconds here.
directory_events_job = dg.define_asset_job(
    "directory_events",
    selection=(SYNCED_ASSETS | dg.AssetSelection.assets("delivered_state")).without_checks(),
    executor_def=dg.in_process_executor,
    description="Apply an organization's waiting webhook events, compute its change sets and deliver them "
    "(webhook sensor).",
)
