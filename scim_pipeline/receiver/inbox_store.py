"""What an inbox backend provides, and the records it deals in. ``Inbox`` (inbox.py) holds everything else: the
writer thread with its group commit, paging, retention's schedule. The backends: ``sqlite_inbox`` (a file in the
home) and ``postgres_inbox`` (tables in ``SCIM_PIPELINE_POSTGRES_URL``'s database, shared by every receiver).

Both promise the same: a row is durable when ``insert`` returns; ``seq`` grows, is never reused, and a reader that
sees seq N sees every stored event below N (so a cursor never skips one committed late); a ``webhook_id`` is stored
once, whichever receiver got it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping, Protocol

COLUMNS = "seq, webhook_id, event_id, type, organization_id, occurred_at, received_at, body"


class InboxClosed(RuntimeError):
    """The inbox no longer accepts events (it is shutting down)."""


class InboxUnavailable(RuntimeError):
    """The inbox's database cannot be reached: nothing in the batch was stored. Not the fault of any one event."""


@dataclass(frozen=True)
class InboxEvent:
    seq: int
    webhook_id: str
    event_id: str | None
    type: str | None
    organization_id: str | None
    occurred_at: str | None  # as Scalekit sent it
    received_at: str
    body: str  # the raw JSON text, exactly as received and signed

    @property
    def payload(self) -> dict[str, Any]:
        return json.loads(self.body)


@dataclass(frozen=True)
class Stored:
    """Outcome of an append, known only once the event is durable."""

    seq: int
    duplicate: bool  # the webhook-id was already in the inbox; ``seq`` is that earlier row's


class Writer(Protocol):
    def insert(self, rows: list[tuple]) -> list[Stored]:
        """Store rows ``(webhook_id, event_id, type, organization_id, occurred_at, received_at, body)`` in one
        transaction, in order; one result per row. Raises InboxUnavailable when the database cannot be reached."""

    def prune(self, cutoff: str, chunk: int) -> int:
        """Delete up to ``chunk`` events received before ``cutoff``, in one transaction; how many were."""

    def close(self) -> None: ...


class Store(Protocol):
    description: str  # names it in messages: the file, or the database URL without its password

    def writer(self) -> Writer:
        """A connection that writes (creating the schema); raises now when it cannot."""

    def read_after(self, seq: int, limit: int) -> list[tuple]: ...
    def read_organization(self, organization_id: str | None, after: int, up_to: int, limit: int) -> list[tuple]: ...
    def organizations(self) -> list[str | None]: ...
    def first_unapplied(self, after: Mapping[str | None, int], up_to: int) -> dict[str | None, tuple[int, str]]: ...
    def applied_marks(self) -> dict[str, int]: ...
    def mark_applied(self, marks: Mapping[str, int]) -> None: ...
    def last_seq(self) -> int: ...
    def count(self) -> int: ...
