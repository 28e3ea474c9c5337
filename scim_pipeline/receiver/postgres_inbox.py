"""The shared inbox store: tables in the database of ``SCIM_PIPELINE_POSTGRES_URL`` (schema ``scim_pipeline``), which
every receiver writes and the webhook sensor reads, whichever host each runs on.

Order: a reader's cursor is the last seq it handed on, so a seq must never become visible after a higher one. Two
receivers drawing from a sequence could commit out of order (10 drawn first, 11 committed first: a reader past 11
would never see 10). So each write transaction first locks the one row of ``inbox_head``, assigns the next seqs from
it and moves it, and commits: writers take turns, and seqs become visible in order, dense, never reused (the head
outlives pruning). With group commit a turn stores a whole batch, so taking turns costs one commit per batch.

Dedup across receivers: under that lock a webhook-id already stored is found and answered as a duplicate; the unique
key on ``webhook_id`` with ``ON CONFLICT DO NOTHING`` is the backstop.

Durability: the writer's session runs with ``synchronous_commit = on`` whatever the server's default, so a commit
has reached the server's WAL on disk before the receiver answers 2xx.
"""

from __future__ import annotations

import threading
from typing import Callable, Mapping

import psycopg2
import psycopg2.errors

from scim_pipeline.lib.clock import utc_iso
from scim_pipeline.lib.postgres import connect, reason, redact
from scim_pipeline.receiver.inbox_store import COLUMNS, InboxUnavailable, Stored

SCHEMA = "scim_pipeline"
EVENTS, HEAD, APPLIED = f"{SCHEMA}.inbox_events", f"{SCHEMA}.inbox_head", f"{SCHEMA}.inbox_applied"

_DDL = f"""
CREATE SCHEMA IF NOT EXISTS {SCHEMA};
CREATE TABLE IF NOT EXISTS {EVENTS} (
    seq             BIGINT PRIMARY KEY,
    webhook_id      TEXT NOT NULL UNIQUE,
    event_id        TEXT,
    type            TEXT,
    organization_id TEXT,
    occurred_at     TEXT,
    received_at     TEXT NOT NULL,
    body            TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS inbox_events_received_at ON {EVENTS} (received_at);
CREATE INDEX IF NOT EXISTS inbox_events_organization ON {EVENTS} (organization_id, seq);
CREATE TABLE IF NOT EXISTS {HEAD} (
    one      BOOLEAN PRIMARY KEY DEFAULT true CHECK (one),
    last_seq BIGINT NOT NULL  -- the highest seq ever assigned
);
INSERT INTO {HEAD} (one, last_seq) VALUES (true, 0) ON CONFLICT DO NOTHING;
CREATE TABLE IF NOT EXISTS {APPLIED} (
    route      TEXT PRIMARY KEY,  -- an organization id, or the name of a run that applies other events
    seq        BIGINT NOT NULL,   -- its events up to this seq are applied (or recorded invalid)
    applied_at TEXT NOT NULL
);
"""
# Receivers starting together would race on CREATE ... IF NOT EXISTS (it is not atomic in PostgreSQL).
_DDL_LOCK = "SELECT pg_advisory_xact_lock(hashtext('scim_pipeline.inbox'))"
_INSERT = (
    f"INSERT INTO {EVENTS} (seq, webhook_id, event_id, type, organization_id, occurred_at, received_at, body)"
    " SELECT * FROM unnest(%s::bigint[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[],"
    " %s::text[]) ON CONFLICT (webhook_id) DO NOTHING"
)
# The server went away, refused, or the connection broke: the batch is not stored, and no event is at fault.
_UNAVAILABLE = (psycopg2.OperationalError, psycopg2.InterfaceError)
# Read before any receiver created the tables: an empty inbox.
_NOT_CREATED = (psycopg2.errors.UndefinedTable, psycopg2.errors.InvalidSchemaName)


def _ensure_schema(conn) -> None:
    with conn.cursor() as cur:
        cur.execute(_DDL_LOCK)
        cur.execute(_DDL)
    conn.commit()


class PostgresWriter:
    """One connection, opened again on the next batch after it broke."""

    def __init__(self, url: str):
        self.url = url
        self.conn = None
        self._connection()  # at start: a database that refuses is said now, not at the first event

    def _connection(self):
        if self.conn is None or self.conn.closed:
            try:
                self.conn = connect(self.url, options="-c synchronous_commit=on")
                _ensure_schema(self.conn)
            except _UNAVAILABLE as exc:
                self._drop()
                raise InboxUnavailable(f"{redact(self.url)}: {reason(exc, self.url)}") from exc
        return self.conn

    def _drop(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except psycopg2.Error:
                pass
        self.conn = None

    def insert(self, rows: list[tuple]) -> list[Stored]:
        conn = self._connection()
        try:
            with conn.cursor() as cur:
                cur.execute(f"SELECT last_seq FROM {HEAD} FOR UPDATE")  # our turn: held until the commit
                (last,) = cur.fetchone()
                cur.execute(f"SELECT webhook_id, seq FROM {EVENTS} WHERE webhook_id = ANY(%s)",
                            (list({row[0] for row in rows}),))
                known = dict(cur.fetchall())
                new, results = [], []
                for row in rows:
                    if row[0] in known:  # stored before, or earlier in this batch
                        results.append(Stored(known[row[0]], True))
                    else:
                        last += 1
                        known[row[0]] = last
                        new.append((last, *row))
                        results.append(Stored(last, False))
                if new:
                    cur.execute(_INSERT, [list(column) for column in zip(*new)])
                    if cur.rowcount != len(new):  # someone wrote without the head's lock: answer nothing wrong
                        raise RuntimeError("webhook inbox: events were stored concurrently without the head lock")
                    cur.execute(f"UPDATE {HEAD} SET last_seq = %s", (last,))
            conn.commit()
            return results
        except _UNAVAILABLE as exc:
            self._drop()  # whether the commit landed is unknown: not acknowledged; a redelivery is a duplicate
            raise InboxUnavailable(f"{redact(self.url)}: {reason(exc, self.url)}") from exc
        except BaseException:
            self._rollback()
            raise

    def _rollback(self) -> None:
        try:
            self.conn.rollback()
        except psycopg2.Error:
            self._drop()

    def prune(self, cutoff: str, chunk: int) -> int:
        conn = self._connection()
        try:
            with conn.cursor() as cur:
                cur.execute(f"DELETE FROM {EVENTS} WHERE seq IN (SELECT seq FROM {EVENTS} WHERE received_at < %s"
                            " ORDER BY seq LIMIT %s)", (cutoff, chunk))
                removed = cur.rowcount
            conn.commit()
            return removed
        except _UNAVAILABLE:
            self._drop()
            raise
        except BaseException:
            self._rollback()
            raise

    def close(self) -> None:
        self._drop()


class PostgresStore:
    """Readers share one read-only connection per store, opened on first use and again after it broke: the webhook
    sensor reads several times a tick, and a new connection costs an authentication each time."""

    def __init__(self, url: str):
        self.url = url
        self.description = redact(url)
        self._conn = None
        self._lock = threading.Lock()

    def writer(self) -> PostgresWriter:
        return PostgresWriter(self.url)

    def _read(self, work: Callable, empty):
        """``work(cursor)`` on the reading connection; ``empty`` before any receiver created the tables."""
        with self._lock:
            for attempt in (1, 2):
                reused = self._conn is not None and not self._conn.closed
                if not reused:
                    try:
                        self._conn = connect(self.url)
                    except _UNAVAILABLE as exc:
                        raise InboxUnavailable(f"{self.description}: {reason(exc, self.url)}") from exc
                    self._conn.set_session(readonly=True, autocommit=True)
                try:
                    with self._conn.cursor() as cur:
                        return work(cur)
                except _NOT_CREATED:
                    return empty
                except _UNAVAILABLE as exc:
                    self._conn.close()
                    if not reused or attempt == 2:  # a kept connection may have died idle (a server restart)
                        raise InboxUnavailable(f"{self.description}: {reason(exc, self.url)}") from exc

    def _query(self, sql: str, params: tuple = ()) -> list[tuple]:
        def work(cur):
            cur.execute(sql, params)
            return cur.fetchall()

        return self._read(work, [])

    def read_after(self, seq: int, limit: int) -> list[tuple]:
        return self._query(f"SELECT {COLUMNS} FROM {EVENTS} WHERE seq > %s ORDER BY seq LIMIT %s", (seq, limit))

    @staticmethod
    def _of(organization_id: str | None) -> tuple[str, tuple]:
        # "IS NOT DISTINCT FROM" would not use the index: NULL gets its own condition.
        return ("organization_id IS NULL", ()) if organization_id is None else ("organization_id = %s",
                                                                               (organization_id,))

    def read_organization(self, organization_id: str | None, after: int, up_to: int, limit: int) -> list[tuple]:
        which, params = self._of(organization_id)
        return self._query(f"SELECT {COLUMNS} FROM {EVENTS} WHERE {which} AND seq > %s AND seq <= %s"
                           " ORDER BY seq LIMIT %s", (*params, after, up_to, limit))

    def organizations(self) -> list[str | None]:
        found = [row[0] for row in self._query(
            f"""
            WITH RECURSIVE orgs(org) AS (
                SELECT min(organization_id) FROM {EVENTS}
                UNION ALL
                SELECT (SELECT min(organization_id) FROM {EVENTS} WHERE organization_id > org) FROM orgs
                WHERE org IS NOT NULL
            )
            SELECT org FROM orgs WHERE org IS NOT NULL
            """)]
        if self._query(f"SELECT 1 FROM {EVENTS} WHERE organization_id IS NULL LIMIT 1"):
            found.insert(0, None)
        return found

    def first_unapplied(self, after: Mapping[str | None, int], up_to: int) -> dict[str | None, tuple[int, str]]:
        def work(cur):
            found = {}
            for org, seq in after.items():
                which, params = self._of(org)
                cur.execute(f"SELECT seq, received_at FROM {EVENTS} WHERE {which} AND seq > %s AND seq <= %s"
                            " ORDER BY seq LIMIT 1", (*params, seq, up_to))
                row = cur.fetchone()
                if row:
                    found[org] = (row[0], row[1])
            return found

        return self._read(work, {})

    def applied_marks(self) -> dict[str, int]:
        return {route: seq for route, seq in self._query(f"SELECT route, seq FROM {APPLIED}")}

    def mark_applied(self, marks: Mapping[str, int]) -> None:
        try:
            conn = connect(self.url)
        except _UNAVAILABLE as exc:
            raise InboxUnavailable(f"{self.description}: {reason(exc, self.url)}") from exc
        try:
            _ensure_schema(conn)
            with conn.cursor() as cur:
                cur.executemany(
                    f"INSERT INTO {APPLIED} (route, seq, applied_at) VALUES (%s, %s, %s) ON CONFLICT (route)"
                    f" DO UPDATE SET seq = greatest({APPLIED}.seq, excluded.seq), applied_at = excluded.applied_at",
                    [(route, seq, utc_iso()) for route, seq in marks.items()])
            conn.commit()
        finally:
            conn.close()

    def last_seq(self) -> int:
        rows = self._query(f"SELECT last_seq FROM {HEAD}")
        return int(rows[0][0]) if rows else 0

    def count(self) -> int:
        rows = self._query(f"SELECT count(*) FROM {EVENTS}")
        return int(rows[0][0]) if rows else 0
