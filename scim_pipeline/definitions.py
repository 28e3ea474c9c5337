"""The code location: one Definitions with every asset, check, job, sensor, schedule and resource."""

import dagster as dg

from scim_pipeline.defs import warehouse_pool
from scim_pipeline.defs.checks import CHECKS
from scim_pipeline.defs.directory.assets import directory_snapshot, scalekit_catalog
from scim_pipeline.defs.directory.automation import discover_organizations, reconciliation_schedule
from scim_pipeline.defs.jobs import directory_catalog_job, directory_events_job, directory_sync_job
from scim_pipeline.defs.provisioning.assets import provisioning
from scim_pipeline.defs.provisioning.delivery import deliver_changes, delivered_state, delivery_sensor
from scim_pipeline.defs.resources import ApplicationResource, ScalekitResource, WarehouseResource
from scim_pipeline.defs.run_reaper import dead_run_reaper
from scim_pipeline.defs.webhooks.quarantine import quarantine_webhook_events
from scim_pipeline.defs.webhooks.sensor import webhook_events_sensor

# Every process that executes runs loads these definitions: a step waiting for the warehouse slot sleeps, says who
# holds it, gives up after a bound and heeds SIGTERM there (see warehouse_pool).
warehouse_pool.install()


defs = dg.Definitions(
    assets=[scalekit_catalog, directory_snapshot, provisioning, delivered_state],
    asset_checks=CHECKS,
    jobs=[directory_catalog_job, directory_sync_job, directory_events_job, deliver_changes, quarantine_webhook_events],
    sensors=[discover_organizations, webhook_events_sensor, delivery_sensor, dead_run_reaper],
    schedules=[reconciliation_schedule],
    resources={
        "scalekit": ScalekitResource(),
        "warehouse": WarehouseResource(),
        "application": ApplicationResource(),
    },
)
