"""The webhook receiver: Scalekit's signed directory events into a durable inbox that the webhook sensor reads.

``Inbox`` is what the sensor imports (the SQLite store needs the stdlib only; the PostgreSQL store's driver is
imported only where that store is used); the ASGI app lives in ``app``.
"""

from scim_pipeline.receiver.inbox import Inbox, InboxEvent, Stored

__all__ = ["Inbox", "InboxEvent", "Stored"]
