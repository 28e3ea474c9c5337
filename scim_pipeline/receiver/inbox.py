"""The durable webhook inbox: every accepted Scalekit event, in arrival order, in one SQLite file.

Why SQLite and not the warehouse: DuckDB admits one process at a time, and the webhook sensor that reads the inbox
lives in Dagster's long-lived code server, which must never hold the warehouse. SQLite in WAL mode lets that sensor
read while the receiver writes, without either blocking the other.

Writes: the receiver answers 2xx only once an event is on disk (``synchronous=FULL``). One fsync per event would
cap throughput at the disk's fsync rate, so a single writer thread does group commit: it takes every event waiting
in its queue, writes them in one transaction, commits once, then resolves each caller.

Reads: ``read_after(seq)`` opens the file read-only for the call only. ``seq`` grows monotonically and is never
reused (AUTOINCREMENT), so a reader's cursor is just the last seq it handed on; the inbox keeps no "consumed" flag.

Retention: rows are pruned 72 h after receipt, longer than Scalekit's retry span, so a redelivered ``webhook-id``
is still recognised as a duplicate.

Applied marks: the runs that apply events record, once their warehouse transaction is committed, the seq up to
which each organization's events are applied (table ``applied``; the warehouse keeps the authoritative copy). The
webhook sensor compares them with the events, here, without opening the warehouse: an organization whose events
stay unapplied after its run failed is asked for again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import queue
import sqlite3
import threading
import time
from collections import defaultdict
from contextlib import closing
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator, Mapping

from scim_pipeline.lib.clock import utc_iso, utcnow

log = logging.getLogger(__name__)

RETENTION_S = 72 * 3600
PRUNE_INTERVAL_S = 600
MAX_BATCH = 2000  # events per transaction; bounds the time one commit holds the writer
_PRUNE_CHUNK = 5000  # rows per delete transaction, so pruning never stalls incoming events for long

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    webhook_id      TEXT NOT NULL UNIQUE,
    event_id        TEXT,
    type            TEXT,
    organization_id TEXT,
    occurred_at     TEXT,
    received_at     TEXT NOT NULL,
    body            TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_received_at ON events (received_at);
CREATE INDEX IF NOT EXISTS events_organization ON events (organization_id, seq);
""" + """
CREATE TABLE IF NOT EXISTS applied (
    route      TEXT PRIMARY KEY,  -- an organization id, or the name of a run that applies other events
    seq        INTEGER NOT NULL,  -- its events up to this seq are applied (or recorded invalid)
    applied_at TEXT NOT NULL
);
"""
_APPLIED_SCHEMA = _SCHEMA[_SCHEMA.index("CREATE TABLE IF NOT EXISTS applied"):]
_COLUMNS = "seq, webhook_id, event_id, type, organization_id, occurred_at, received_at, body"
_INSERT = (
    "INSERT INTO events (webhook_id, event_id, type, organization_id, occurred_at, received_at, body)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)


class InboxClosed(RuntimeError):
    """The inbox no longer accepts events (it is shutting down)."""


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


def _text(value: Any) -> str | None:
    # Envelope fields are strings in Scalekit's events; anything else is kept only in the body.
    return value if isinstance(value, str) else None


class _Pending:
    __slots__ = ("row", "future", "loop")

    def __init__(self, row: tuple, future: Any, loop: asyncio.AbstractEventLoop | None):
        self.row = row
        self.future = future  # asyncio.Future when loop is set, else concurrent.futures.Future
        self.loop = loop


_STOP = object()


class Inbox:
    """The inbox file at ``path``.

    Readers (``read_after``, ``last_seq``, ``count``) need nothing else and never write. The writer thread starts
    on ``start()`` or the first append, and ``close()`` flushes and stops it.
    """

    def __init__(self, path: str | Path, retention_s: float = RETENTION_S, prune_interval_s: float = PRUNE_INTERVAL_S):
        self.path = Path(path)
        self.retention_s = retention_s
        self.prune_interval_s = prune_interval_s
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False

    # ----------------------------------------------------------------------------------------------- writing

    def start(self) -> None:
        """Open the file for writing (creating it and its schema) and start the writer thread. Idempotent.
        Raises sqlite3.Error or OSError here, at start-up, when the file cannot be written."""
        with self._lock:
            if self._closed:
                raise InboxClosed("inbox is closed")
            if self._thread is not None:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")  # WAL + FULL: each commit is fsynced before it returns
                conn.executescript(_SCHEMA)
                self._prune(conn)
            except BaseException:
                conn.close()
                raise
            self._thread = threading.Thread(target=self._run, args=(conn,), name="inbox-writer", daemon=True)
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

    def _run(self, conn: sqlite3.Connection) -> None:
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
                    self._write(conn, batch)
                if time.monotonic() >= next_prune:
                    try:
                        self._prune(conn)
                    except sqlite3.Error:
                        log.exception("pruning the webhook inbox failed; will retry")
                    next_prune = time.monotonic() + self.prune_interval_s
        finally:
            conn.close()

    def _write(self, conn: sqlite3.Connection, batch: list[_Pending]) -> None:
        try:
            results: list[Any] = self._insert(conn, [p.row for p in batch])
        except Exception:
            # One bad event must not fail its neighbours: retry each alone, so only the culprit gets the error.
            log.exception("writing %d events to the webhook inbox failed; retrying one by one", len(batch))
            results = []
            for p in batch:
                try:
                    results.extend(self._insert(conn, [p.row]))
                except Exception as exc:
                    results.append(exc)
        self._resolve(batch, results)

    @staticmethod
    def _insert(conn: sqlite3.Connection, rows: list[tuple]) -> list[Stored]:
        results = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for row in rows:
                # Look up before inserting: an ignored INSERT OR IGNORE would still consume a seq (AUTOINCREMENT).
                found = conn.execute("SELECT seq FROM events WHERE webhook_id = ?", (row[0],)).fetchone()
                if found:
                    results.append(Stored(found[0], True))
                else:
                    results.append(Stored(conn.execute(_INSERT, row).lastrowid, False))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return results

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

    def _prune(self, conn: sqlite3.Connection) -> int:
        cutoff = utc_iso(utcnow() - timedelta(seconds=self.retention_s))
        removed = 0
        while True:
            cur = conn.execute(
                "DELETE FROM events WHERE seq IN (SELECT seq FROM events WHERE received_at < ? ORDER BY seq LIMIT ?)",
                (cutoff, _PRUNE_CHUNK),
            )
            removed += cur.rowcount
            if cur.rowcount < _PRUNE_CHUNK:
                break
        if removed:
            log.info("pruned %d webhook events received before %s", removed, cutoff)
        return removed

    # ----------------------------------------------------------------------------------------------- reading

    def _reader(self) -> sqlite3.Connection | None:
        if not self.path.exists():
            return None
        # Read-only and per call: a reader never takes a write lock, and a long-lived process keeps nothing open.
        return sqlite3.connect(self.path.resolve().as_uri() + "?mode=ro", uri=True, timeout=10, check_same_thread=False)

    def _query(self, sql: str, params: tuple = ()) -> list[tuple]:
        conn = self._reader()
        if conn is None:
            return []
        with closing(conn):
            try:
                return conn.execute(sql, params).fetchall()
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):  # the receiver has not created its schema yet
                    return []
                raise

    def read_after(self, seq: int, limit: int = 1000) -> list[InboxEvent]:
        """Up to ``limit`` events with a seq greater than ``seq``, in seq order."""
        rows = self._query(f"SELECT {_COLUMNS} FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit))
        return [InboxEvent(*row) for row in rows]

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
            rows = self._query(
                f"SELECT {_COLUMNS} FROM events WHERE organization_id IS ? AND seq > ? AND seq <= ?"
                " ORDER BY seq LIMIT ?", (organization_id, seq, end, page))
            yield from (InboxEvent(*row) for row in rows)
            if len(rows) < page:
                return
            seq = rows[-1][0]

    def organizations(self) -> list[str | None]:
        """Every ``organization_id`` value among the events, None first if some have none. One index probe per
        value (a skip scan), not a pass over the events."""
        found = [row[0] for row in self._query(
            """
            WITH RECURSIVE orgs(org) AS (
                SELECT min(organization_id) FROM events
                UNION ALL
                SELECT (SELECT min(organization_id) FROM events WHERE organization_id > org) FROM orgs
                WHERE org IS NOT NULL
            )
            SELECT org FROM orgs WHERE org IS NOT NULL
            """)]
        if self._query("SELECT 1 FROM events WHERE organization_id IS NULL LIMIT 1"):
            found.insert(0, None)
        return found

    def first_unapplied(self, after: Mapping[str | None, int], up_to: int) -> dict[str | None, tuple[int, str]]:
        """For each ``organization_id`` value of ``after``: its first event with ``after[value] < seq <= up_to``, as
        (seq, received_at); values with none are left out."""
        conn = self._reader()
        if conn is None:
            return {}
        found = {}
        with closing(conn):
            for org, seq in after.items():
                try:
                    row = conn.execute(
                        "SELECT seq, received_at FROM events WHERE organization_id IS ? AND seq > ? AND seq <= ?"
                        " ORDER BY seq LIMIT 1", (org, seq, up_to)).fetchone()
                except sqlite3.OperationalError as exc:
                    if "no such table" in str(exc):
                        return {}
                    raise
                if row:
                    found[org] = (row[0], row[1])
        return found

    def applied_marks(self) -> dict[str, int]:
        """The applied marks: route (an organization id, or the name of another applier) -> seq."""
        return {route: seq for route, seq in self._query("SELECT route, seq FROM applied")}

    def mark_applied(self, marks: Mapping[str, int]) -> None:
        """Record that each route's events up to its seq are applied; a mark never moves back. Nothing happens
        without an inbox file (there are no events to mark)."""
        if not marks or not self.path.exists():
            return
        # Its own short connection: the appliers run in other processes than the receiver's writer thread.
        with closing(sqlite3.connect(self.path, timeout=30, isolation_level=None)) as conn:
            conn.executescript(_APPLIED_SCHEMA)
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(
                    "INSERT INTO applied (route, seq, applied_at) VALUES (?, ?, ?)"
                    " ON CONFLICT (route) DO UPDATE SET seq = max(seq, excluded.seq), applied_at = excluded.applied_at",
                    [(route, seq, utc_iso()) for route, seq in marks.items()])
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def last_seq(self) -> int:
        """The highest seq ever assigned (0 for an empty inbox), even if that row has since been pruned."""
        rows = self._query("SELECT seq FROM sqlite_sequence WHERE name = 'events'")
        return int(rows[0][0]) if rows else 0

    def count(self) -> int:
        rows = self._query("SELECT count(*) FROM events")
        return int(rows[0][0]) if rows else 0


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
