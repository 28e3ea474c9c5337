"""The code location: one Definitions with every asset, check, job, sensor, schedule and resource."""

import dagster as dg

from scim_pipeline.defs.checks import CHECKS
from scim_pipeline.defs.directory.assets import directory_snapshot, scalekit_catalog
from scim_pipeline.defs.directory.automation import discover_organizations, reconciliation_schedule
from scim_pipeline.defs.provisioning.assets import provisioning
from scim_pipeline.defs.provisioning.delivery import deliver_changes, delivery_sensor
from scim_pipeline.defs.webhooks.sensor import webhook_events_sensor
from scim_pipeline.resources.application import ApplicationResource
from scim_pipeline.resources.scalekit import ScalekitResource
from scim_pipeline.resources.warehouse import WarehouseResource
from scim_pipeline.run_reaper import dead_run_reaper


directory_catalog_job = dg.define_asset_job(
    "directory_catalog", selection=["organizations", "directories"], executor_def=dg.in_process_executor,
    description="List Scalekit's organizations and directories into the warehouse.",
)
directory_sync_job = dg.define_asset_job(
    "directory_sync",
    selection=dg.AssetSelection.assets(
        "directory_users", "directory_groups", "group_memberships", "role_assignments", "directory_users_history",
        "change_sets",
    ),
    executor_def=dg.in_process_executor,  # a step subprocess costs more than the work of an incremental run
    description="Sync organizations (full snapshot, or the waiting webhook events) and compute their change sets.",
)

defs = dg.Definitions(
    assets=[scalekit_catalog, directory_snapshot, provisioning],
    asset_checks=CHECKS,
    jobs=[directory_catalog_job, directory_sync_job, deliver_changes],
    sensors=[discover_organizations, webhook_events_sensor, delivery_sensor, dead_run_reaper],
    schedules=[reconciliation_schedule],
    resources={
        "scalekit": ScalekitResource(),
        "warehouse": WarehouseResource(),
        "application": ApplicationResource(),
    },
)
