"""The webhook receiver: Scalekit's signed directory events into a durable inbox that the webhook sensor reads.

``Inbox`` (stdlib only) is what the sensor imports; the ASGI app lives in ``app``.
"""

from scim_pipeline.receiver.inbox import Inbox, InboxEvent, Stored

__all__ = ["Inbox", "InboxEvent", "Stored"]
