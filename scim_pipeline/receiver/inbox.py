"""The durable webhook inbox: every accepted Scalekit event, in arrival order, behind one interface with two stores
chosen by the setting: a SQLite file in the home (``sqlite_inbox``, embedded, the default) or tables in the
PostgreSQL database of ``SCIM_PIPELINE_POSTGRES_URL`` (``postgres_inbox``), which several receivers share.

Why not the warehouse: DuckDB admits one process at a time, and the webhook sensor that reads the inbox lives in
Dagster's long-lived code server, which must never hold the warehouse.

Writes: the receiver answers 2xx only once an event is durable. One commit per event would cap throughput at the
disk's fsync rate, so a single writer thread does group commit: it takes every event waiting in its queue, writes
them in one transaction, commits once, then resolves each caller.

Reads: ``read_after(seq)`` needs no writer. ``seq`` grows monotonically and is never reused, so a reader's cursor is
just the last seq it handed on; the inbox keeps no "consumed" flag.

Retention: rows are pruned 72 h after receipt, longer than Scalekit's retry span, so a redelivered ``webhook-id``
is still recognised as a duplicate.

Applied marks: the runs that apply events record, once their warehouse transaction is committed, the seq up to
which each organization's events are applied (``applied``; the warehouse keeps the authoritative copy). The
webhook sensor compares them with the events, here, without opening the warehouse: an organization whose events
stay unapplied after its run failed is asked for again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import queue
import threading
import time
from collections import defaultdict
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator, Mapping

from scim_pipeline.lib.clock import utc_iso, utcnow
from scim_pipeline.receiver.inbox_store import InboxClosed, InboxEvent, InboxUnavailable, Store, Stored, Writer

__all__ = ["Inbox", "InboxClosed", "InboxEvent", "InboxUnavailable", "Stored", "is_database_url"]

log = logging.getLogger(__name__)

RETENTION_S = 72 * 3600
PRUNE_INTERVAL_S = 600
MAX_BATCH = 2000  # events per transaction; bounds the time one commit holds the writer
_PRUNE_CHUNK = 5000  # rows per delete transaction, so pruning never stalls incoming events for long


def is_database_url(location: str | Path) -> bool:
    return isinstance(location, str) and location.lower().startswith("postgresql://")


def open_store(location: str | Path) -> Store:
    """The store at ``location``: a PostgreSQL URL, else the path of a SQLite file."""
    if is_database_url(location):
        from scim_pipeline.receiver.postgres_inbox import PostgresStore  # its driver only where it is used

        return PostgresStore(str(location))
    from scim_pipeline.receiver.sqlite_inbox import SQLiteStore

    return SQLiteStore(location)


def _text(value: Any) -> str | None:
    # Envelope fields are strings in Scalekit's events; anything else is kept only in the body (so is a string with
    # a NUL, which no id holds and PostgreSQL's text cannot: the body keeps it escaped, as JSON text does).
    return value if isinstance(value, str) and "\x00" not in value else None


class _Pending:
    __slots__ = ("row", "future", "loop")

    def __init__(self, row: tuple, future: Any, loop: asyncio.AbstractEventLoop | None):
        self.row = row
        self.future = future  # asyncio.Future when loop is set, else concurrent.futures.Future
        self.loop = loop


_STOP = object()


class Inbox:
    """The inbox at ``location``: a PostgreSQL URL (``is_database_url``), else the path of a SQLite file.

    Readers (``read_after``, ``last_seq``, ``count``) need nothing else and never write. The writer thread starts
    on ``start()`` or the first append, and ``close()`` flushes and stops it.
    """

    def __init__(self, location: str | Path, retention_s: float = RETENTION_S,
                 prune_interval_s: float = PRUNE_INTERVAL_S):
        self.store = open_store(location)
        self.retention_s = retention_s
        self.prune_interval_s = prune_interval_s
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def description(self) -> str:
        """The file, or the database URL without its password."""
        return self.store.description

    # ----------------------------------------------------------------------------------------------- writing

    def start(self) -> None:
        """Open the store for writing (creating its schema) and start the writer thread. Idempotent. Raises here,
        at start-up, when the store cannot be written (InboxUnavailable for a database that cannot be reached)."""
        with self._lock:
            if self._closed:
                raise InboxClosed("inbox is closed")
            if self._thread is not None:
                return
            writer = self.store.writer()
            try:
                self._prune(writer)
            except BaseException:
                writer.close()
                raise
            self._thread = threading.Thread(target=self._run, args=(writer,), name="inbox-writer", daemon=True)
            self._thread.start()

    async def append(
        self, webhook_id: str, body: str, payload: Mapping[str, Any], received_at: str | None = None
    ) -> Stored:
        """Store one event and return once it is durable. ``body`` is the raw JSON text, ``payload`` its parsed
        object (the indexed columns come from its envelope)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._submit(self._row(webhook_id, body, payload, received_at), future, loop)
        return await future

    def put(self, webhook_id: str, body: str, payload: Mapping[str, Any] | None = None,
            received_at: str | None = None, timeout: float | None = 30) -> Stored:
        """Blocking form of ``append`` for code without an event loop; ``payload`` defaults to the parsed body."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        payload = json.loads(body) if payload is None else payload
        self._submit(self._row(webhook_id, body, payload, received_at), future, None)
        return future.result(timeout)

    def close(self, timeout: float | None = 30) -> None:
        """Write everything already submitted, then stop the writer. Later appends raise InboxClosed."""
        with self._lock:
            if self._closed:
                thread = self._thread
            else:
                self._closed = True
                thread = self._thread
                if thread is not None:
                    self._queue.put(_STOP)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def __enter__(self) -> "Inbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def _row(webhook_id: str, body: str, payload: Mapping[str, Any], received_at: str | None) -> tuple:
        return (
            webhook_id, _text(payload.get("id")), _text(payload.get("type")), _text(payload.get("organization_id")),
            _text(payload.get("occurred_at")), received_at or utc_iso(), body,
        )

    def _submit(self, row: tuple, future: Any, loop: asyncio.AbstractEventLoop | None) -> None:
        if self._thread is None:
            self.start()
        # Under the lock so that nothing lands in the queue behind the stop marker, unanswered.
        with self._lock:
            if self._closed:
                raise InboxClosed("inbox is closed")
            self._queue.put(_Pending(row, future, loop))

    def _run(self, writer: Writer) -> None:
        next_prune = time.monotonic() + self.prune_interval_s
        try:
            stopping = False
            while not stopping:
                try:
                    first = self._queue.get(timeout=max(0.0, next_prune - time.monotonic()))
                except queue.Empty:
                    first = None
                batch: list[_Pending] = []
                item = first
                while item is not None:
                    if item is _STOP:
                        stopping = True
                        break
                    batch.append(item)
                    if len(batch) >= MAX_BATCH:
                        break
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        item = None
                if batch:
                    self._write(writer, batch)
                if time.monotonic() >= next_prune:
                    try:
                        self._prune(writer)
                    except Exception:
                        log.exception("pruning the webhook inbox failed; will retry")
                    next_prune = time.monotonic() + self.prune_interval_s
        finally:
            writer.close()

    def _write(self, writer: Writer, batch: list[_Pending]) -> None:
        try:
            results: list[Any] = writer.insert([p.row for p in batch])
        except InboxUnavailable as exc:
            # The database is away: no event is at fault, and trying each alone would only wait on it again.
            log.warning("webhook inbox unavailable, %d event(s) not stored: %s", len(batch), exc)
            results = [exc] * len(batch)
        except Exception:
            # One bad event must not fail its neighbours: retry each alone, so only the culprit gets the error.
            log.exception("writing %d events to the webhook inbox failed; retrying one by one", len(batch))
            results = []
            for p in batch:
                try:
                    results.extend(writer.insert([p.row]))
                except Exception as exc:
                    results.append(exc)
        self._resolve(batch, results)

    @staticmethod
    def _resolve(batch: list[_Pending], results: list[Any]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        for pending, result in zip(batch, results):
            if pending.loop is None:
                _settle(pending.future, result)
            else:
                by_loop[pending.loop].append((pending.future, result))
        # One wake-up per event loop and batch, not one per event.
        for loop, settled in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle_all, settled)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

    def _prune(self, writer: Writer) -> int:
        cutoff = utc_iso(utcnow() - timedelta(seconds=self.retention_s))
        removed = 0
        while True:
            deleted = writer.prune(cutoff, _PRUNE_CHUNK)
            removed += deleted
            if deleted < _PRUNE_CHUNK:
                break
        if removed:
            log.info("pruned %d webhook events received before %s", removed, cutoff)
        return removed

    # ----------------------------------------------------------------------------------------------- reading

    def read_after(self, seq: int, limit: int = 1000) -> list[InboxEvent]:
        """Up to ``limit`` events with a seq greater than ``seq``, in seq order."""
        return [InboxEvent(*row) for row in self.store.read_after(seq, limit)]

    def read_range(self, after: int, up_to: int = 0, page: int = 1000) -> Iterator[InboxEvent]:
        """Every event with ``after < seq <= up_to`` (``up_to`` 0: to the end), in seq order, read a page at a time."""
        seq = after
        while not up_to or seq < up_to:
            events = self.read_after(seq, limit=page)
            for event in events:
                if up_to and event.seq > up_to:
                    return
                yield event
            if len(events) < page:
                return
            seq = events[-1].seq

    def read_organization(self, organization_id: str | None, after: int, up_to: int = 0,
                          page: int = 1000) -> Iterator[InboxEvent]:
        """The events of one ``organization_id`` value (None: events without one) with ``after < seq <= up_to``
        (``up_to`` 0: to the end), in seq order, through the index on the organization."""
        seq, end = after, up_to or self.last_seq()
        while seq < end:
            rows = self.store.read_organization(organization_id, seq, end, page)
            yield from (InboxEvent(*row) for row in rows)
            if len(rows) < page:
                return
            seq = rows[-1][0]

    def organizations(self) -> list[str | None]:
        """Every ``organization_id`` value among the events, None first if some have none. One index probe per
        value (a skip scan), not a pass over the events."""
        return self.store.organizations()

    def first_unapplied(self, after: Mapping[str | None, int], up_to: int) -> dict[str | None, tuple[int, str]]:
        """For each ``organization_id`` value of ``after``: its first event with ``after[value] < seq <= up_to``, as
        (seq, received_at); values with none are left out."""
        return self.store.first_unapplied(after, up_to)

    def applied_marks(self) -> dict[str, int]:
        """The applied marks: route (an organization id, or the name of another applier) -> seq."""
        return self.store.applied_marks()

    def mark_applied(self, marks: Mapping[str, int]) -> None:
        """Record that each route's events up to its seq are applied; a mark never moves back. On SQLite, nothing
        happens without an inbox file (there are no events to mark)."""
        if marks:
            self.store.mark_applied(marks)

    def last_seq(self) -> int:
        """The highest seq ever assigned (0 for an empty inbox), even if that row has since been pruned."""
        return self.store.last_seq()

    def count(self) -> int:
        return self.store.count()


def _settle(future: Any, result: Any) -> None:
    if future.done():  # the caller gave up (e.g. the client disconnected); the event is stored all the same
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


def _settle_all(settled: list) -> None:
    for future, result in settled:
        _settle(future, result)
