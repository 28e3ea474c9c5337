"""Delivery: the ledger is an outbox, and this is its only way out (``provisioning.delivery``).

The delivery sensor reads the outbox index (SQLite; never DuckDB) for organizations whose changes are ready —
change sets just computed by a full sync, failed changes whose backoff has passed, held changes just approved, dead
changes revived, deliveries that died under their lease — and launches one small in-process run that delivers them
all. The webhook path delivers its organization's changes as
the last step of its own run (the ``delivered_state`` asset), sparing a leaver a second sensor hop and run start-up;
the outbox index keeps a later mark for it, so whatever that step could not send goes out through the sensor.
An application that is down fails nothing upstream: its changes wait in the ledger.
"""

import dagster as dg

from scim_pipeline.config import settings
from scim_pipeline.defs.partitions import organizations_partitions
from scim_pipeline.defs.resources import ApplicationResource
from scim_pipeline.defs.warehouse_pool import PoolTurns
from scim_pipeline.lib.clock import utcnow
from scim_pipeline.provisioning.delivery import DeliveryPolicy, deliver_ready
from scim_pipeline.provisioning.outbox_index import Lease, OutboxIndex
from scim_pipeline.warehouse.connection import Warehouse


OBSERVED_ORGANIZATIONS = 100  # a delivery run observes ``delivered_state`` of at most this many organizations


class DeliveryConfig(dg.Config):
    organizations: list[str] = []  # delivery job: empty means every organization whose changes are due
    max_attempts: int = 8
    backoff_s: float = 30.0
    batch_size: int = 500
    dead_cooldown_s: float = 900.0  # a dead change is tried again this long after it died, once the application answers


def _deliver(context, config: DeliveryConfig, orgs: list[str], lease: Lease, warehouse: dg.ResourceParam[Warehouse],
             application: ApplicationResource) -> tuple[dict, list[str]]:
    """Deliver these organizations' ready changes under the outbox lease; returns the materialization metadata of
    ``delivered_state`` and the organizations that had changes to send. If this raises, the lease is left to run
    out, and the sensor delivers them again then."""
    outbox = OutboxIndex(settings().outbox_index_path)
    policy = DeliveryPolicy(config.max_attempts, config.backoff_s, batch_size=config.batch_size,
                            dead_cooldown_s=config.dead_cooldown_s)
    with application.client() as client:
        report = deliver_ready(warehouse, client, orgs, outbox, policy, progress=context.log.info, lease=lease,
                               turns=PoolTurns.of(context))
    if report.dead:
        context.log.error(f"{report.dead} change(s) are dead: see `scim-pipeline changes --status dead`; they are "
                          "tried again after the next successful delivery, at the next full sync, or with "
                          "`scim-pipeline retry`")
    return {
        "delivered": report.applied, "rejected": report.rejected, "failed": report.failed, "dead": report.dead,
        "revived": report.revived, "in_doubt_rederived": report.replaced,
        "held_back_disabled_directory": report.held_back,
        **{f"delivered/{k}": v for k, v in sorted(report.sent.items())},
        "errors": dg.MetadataValue.json(report.errors),
    }, report.organizations


# No ``pool`` for the step: delivery talks to the application for seconds (minutes when it is down and retried), and
# takes the pool's slot only for its short writes before and after (PoolTurns), so syncs are never held up behind an
# application, and a warehouse busy with other writers serves its writes in turn instead of starving them.
@dg.asset(
    deps=["change_sets"],
    partitions_def=organizations_partitions,
    backfill_policy=dg.BackfillPolicy.single_run(),
    group_name="provisioning",
    kinds={"duckdb"},
    description="What the application has acknowledged (delivered_users, delivered_memberships, delivered_roles): "
    "advanced by sending the ledger's ready changes and recording each answer.",
)
def delivered_state(context: dg.AssetExecutionContext, config: DeliveryConfig, warehouse: dg.ResourceParam[Warehouse],
                    application: ApplicationResource) -> dg.MaterializeResult:
    orgs = list(context.partition_keys)
    lease = OutboxIndex(settings().outbox_index_path).claim(orgs, utcnow(), due_only=False)
    metadata, _ = _deliver(context, config, orgs, lease, warehouse, application)
    return dg.MaterializeResult(metadata=metadata)


@dg.op(description="Send the ready changes of these organizations to the application and record each answer.",
       tags={"kind": "delivery"})
def deliver(context: dg.OpExecutionContext, config: DeliveryConfig, warehouse: dg.ResourceParam[Warehouse],
            application: ApplicationResource) -> None:
    outbox = OutboxIndex(settings().outbox_index_path)
    now = utcnow()
    lease = outbox.claim(config.organizations or outbox.due(now), now)
    orgs = lease.organizations
    if not orgs:
        context.log.info("nothing is due")
        return
    metadata, sent_to = _deliver(context, config, orgs, lease, warehouse, application)
    # ``delivered_state`` has one owner, its asset (the webhook path's last step); what a delivery run sent shows on
    # the same asset's page as an observation of each organization it had changes for (not of every organization
    # it looked at: a run over a thousand would log a thousand events for nothing). A run that sent to more than
    # OBSERVED_ORGANIZATIONS (a first sync, the catch-up after an outage) observes none: each event is a write to
    # Dagster's storage, a thousand of them cost more than the delivery; its log and the ledger say what it sent.
    if len(sent_to) > OBSERVED_ORGANIZATIONS:
        context.log.info(f"sent changes to {len(sent_to)} organizations: per organization in this run's log above, "
                         "and in `scim-pipeline changes`")
        return
    for org in sent_to:
        context.log_event(dg.AssetObservation(asset_key="delivered_state", partition=org,
                                              metadata=metadata if len(orgs) == 1 else {"run_total": metadata["delivered"]}))


@dg.job(executor_def=dg.in_process_executor, tags={"scim_pipeline/kind": "delivery"},
        description="Deliver ready change sets to the application (launched by the delivery sensor).")
def deliver_changes():
    deliver()


# Every 5 s (what Dagster's own daemon loop gave it anyway): the webhook path delivers in its own run, so this sensor
# carries what can wait seconds (retries, approvals, a full sync's catch-up), and each tick costs the daemon and the
# code server CPU that the webhook path's runs need on a small host.
@dg.sensor(job=deliver_changes, minimum_interval_seconds=5, default_status=dg.DefaultSensorStatus.RUNNING,
           description="Launches a delivery run when changes are ready: new change sets, retries whose backoff "
           "passed, approved or released held changes, dead changes tried again, deliveries whose lease ran out.")
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
