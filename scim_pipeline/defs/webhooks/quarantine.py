"""Webhook events that name no organization: recorded as ``invalid``, never applied.

An event's organization names its partition, its run and the files of a sync, so an event whose
``organization_id`` is not a Scalekit organization id has no run of its own. The webhook sensor sends such events
here, to be recorded in ``webhook_events`` with the reason, where an operator can see them.
"""

import dagster as dg

from scim_pipeline.config import settings
from scim_pipeline.defs.partitions import WAREHOUSE_POOL
from scim_pipeline.lib.clock import utcnow
from scim_pipeline.receiver.inbox import Inbox
from scim_pipeline.scalekit import ids
from scim_pipeline.warehouse.connection import Warehouse
from scim_pipeline.warehouse.events import apply_events, event_from_inbox


class QuarantineConfig(dg.Config):
    after_seq: int = 0  # the inbox's events after this sequence number
    up_to_seq: int = 0  # up to this one (0: to the end)


@dg.op(pool=WAREHOUSE_POOL, description="Records the inbox's events that name no organization as invalid.")
def record_unroutable_events(context: dg.OpExecutionContext, config: QuarantineConfig,
                             warehouse: dg.ResourceParam[Warehouse]) -> dict:
    events = [event_from_inbox(item) for item in Inbox(settings().inbox_path).read_range(config.after_seq, config.up_to_seq)
              if not ids.ORGANIZATION.matches(item.organization_id)]
    with warehouse.write() as con:
        outcomes = apply_events(con, events, utcnow())
    context.log.info(f"recorded {len(events)} webhook event(s) that name no organization: {outcomes}")
    return outcomes


@dg.job(executor_def=dg.in_process_executor,
        description="Record the webhook events that name no valid organization as invalid (webhook sensor).")
def quarantine_webhook_events():
    record_unroutable_events()
