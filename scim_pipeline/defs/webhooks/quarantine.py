"""Webhook events that name no organization: recorded as ``invalid``, never applied.

An event's organization names its partition, its run and the files of a sync, so an event whose
``organization_id`` is not a Scalekit organization id has no run of its own. The webhook sensor sends such events
here, to be recorded in ``webhook_events`` with the reason, where an operator can see them.
"""

import dagster as dg

from scim_pipeline.config import settings
from scim_pipeline.defs.directory.assets import publish_marks
from scim_pipeline.defs.partitions import WAREHOUSE_POOL
from scim_pipeline.lib.clock import utcnow
from scim_pipeline.receiver.inbox import Inbox
from scim_pipeline.scalekit import ids
from scim_pipeline.warehouse.connection import Warehouse
from scim_pipeline.warehouse.events import QUARANTINE, applied_marks, apply_events, event_from_inbox, record_applied


class QuarantineConfig(dg.Config):
    up_to_seq: int = 0  # the inbox's events up to this sequence number (0: to the end)
    after_seq: int = 0  # how far the sensor saw them recorded, for the record; the run starts from the warehouse's


@dg.op(pool=WAREHOUSE_POOL, description="Records the inbox's events that name no organization as invalid.")
def record_unroutable_events(context: dg.OpExecutionContext, config: QuarantineConfig,
                             warehouse: dg.ResourceParam[Warehouse]) -> dict:
    # As an incremental run does: from the warehouse's own mark, so that a failed run's events are not lost.
    inbox = Inbox(settings().inbox_location)
    end = config.up_to_seq or inbox.last_seq()
    with warehouse.write() as con:
        start = applied_marks(con, [QUARANTINE])[QUARANTINE]
        events = [event_from_inbox(item) for item in inbox.read_range(start, end)
                  if not ids.ORGANIZATION.matches(item.organization_id)]
        outcomes = apply_events(con, events, utcnow())
        marks = {QUARANTINE: max(start, end)}
        record_applied(con, marks, utcnow())
    publish_marks(context, inbox, marks)
    context.log.info(f"recorded {len(events)} webhook event(s) that name no organization: {outcomes}")
    return outcomes


@dg.job(executor_def=dg.in_process_executor,
        description="Record the webhook events that name no valid organization as invalid (webhook sensor).")
def quarantine_webhook_events():
    record_unroutable_events()
