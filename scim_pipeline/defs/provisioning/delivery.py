"""Delivery runs and the delivery sensor: the ledger is an outbox, and this is its only way out.

The sensor reads the outbox index (SQLite; never DuckDB) for organizations whose changes are ready — change sets
just computed, failed changes whose backoff has passed, held changes just approved — and launches one small
in-process run that delivers them all. An application that is down fails nothing upstream: its changes wait.
"""


import dagster as dg

from scim_pipeline.config import settings
from scim_pipeline import delivery
from scim_pipeline.directory_sync import utcnow
from scim_pipeline.outbox_index import OutboxIndex
from scim_pipeline.resources.application import ApplicationResource
from scim_pipeline.resources.warehouse import WarehouseResource


class DeliveryConfig(dg.Config):
    organizations: list[str] = []  # empty: every organization whose changes are due
    max_attempts: int = 8
    backoff_s: float = 30.0
    batch_size: int = 500


@dg.op(description="Send the ready changes of these organizations to the application and record each answer.",
       tags={"kind": "delivery"})
def deliver(context: dg.OpExecutionContext, config: DeliveryConfig, warehouse: WarehouseResource,
                    application: ApplicationResource) -> None:
    outbox = OutboxIndex(settings().outbox_index_path)
    now = utcnow()
    orgs = outbox.claim(config.organizations or outbox.due(now), now)
    if not orgs:
        context.log.info("nothing is due")
        return
    policy = delivery.DeliveryPolicy(config.max_attempts, config.backoff_s, batch_size=config.batch_size)
    with application.client() as client:
        report = delivery.deliver(warehouse.warehouse(), client, orgs, outbox, policy, progress=context.log.info)
    context.log_event(dg.AssetObservation(asset_key="change_sets", metadata={
        "delivered": report.applied, "rejected": report.rejected, "failed": report.failed, "dead": report.dead,
        "held_back_disabled_directory": report.held_back,
        **{f"delivered/{k}": v for k, v in sorted(report.sent.items())},
        "errors": dg.MetadataValue.json(report.errors),
    }))
    if report.dead:
        context.log.error(f"{report.dead} change(s) are dead: see `scim-pipeline changes --status dead`")


@dg.job(executor_def=dg.in_process_executor, tags={"scim_pipeline/kind": "delivery"},
        description="Deliver ready change sets to the application (launched by the delivery sensor).")
def deliver_changes():
    deliver()


@dg.sensor(job=deliver_changes, minimum_interval_seconds=1, default_status=dg.DefaultSensorStatus.RUNNING,
           description="Launches a delivery run when changes are ready: new change sets, retries whose backoff "
           "passed, approved held changes.")
def delivery_sensor(context: dg.SensorEvaluationContext):
    due = OutboxIndex(settings().outbox_index_path).due(utcnow())
    if not due:
        return dg.SkipReason("nothing ready to send")
    in_flight = context.instance.get_run_records(
        dg.RunsFilter(job_name=deliver_changes.name, statuses=[
            dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
            dg.DagsterRunStatus.STARTED]),
        limit=1,
    )
    if in_flight:
        return dg.SkipReason("a delivery run is in flight; the rest waits for the next tick")
    return dg.RunRequest(
        run_config={"ops": {"deliver": {"config": {"organizations": due}}}},
        tags={"scim_pipeline/organizations": ",".join(due)[:200]},
    )
