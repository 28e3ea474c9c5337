"""The embedded inbox store: one SQLite file in ``SCIM_PIPELINE_HOME`` (when ``SCIM_PIPELINE_POSTGRES_URL`` is unset).

SQLite in WAL mode lets the webhook sensor read while the receiver writes, without either blocking the other. Each
commit is fsynced before it returns (WAL + ``synchronous=FULL``). ``seq`` is AUTOINCREMENT: never reused, even after
pruning. Readers open the file read-only for one call: they never take a write lock, never create the file, and a
long-lived process keeps nothing open.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Mapping

from scim_pipeline.lib.clock import utc_iso
from scim_pipeline.receiver.inbox_store import COLUMNS, Stored

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
_INSERT = (
    "INSERT INTO events (webhook_id, event_id, type, organization_id, occurred_at, received_at, body)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)


class SQLiteWriter:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        try:
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")  # WAL + FULL: each commit is fsynced before it returns
            self.conn.executescript(_SCHEMA)
        except BaseException:
            self.conn.close()
            raise

    def insert(self, rows: list[tuple]) -> list[Stored]:
        conn, results = self.conn, []
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

    def prune(self, cutoff: str, chunk: int) -> int:
        return self.conn.execute(
            "DELETE FROM events WHERE seq IN (SELECT seq FROM events WHERE received_at < ? ORDER BY seq LIMIT ?)",
            (cutoff, chunk)).rowcount

    def close(self) -> None:
        self.conn.close()


class SQLiteStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.description = str(self.path)

    def writer(self) -> SQLiteWriter:
        return SQLiteWriter(self.path)

    def _reader(self) -> sqlite3.Connection | None:
        if not self.path.exists():
            return None
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

    def read_after(self, seq: int, limit: int) -> list[tuple]:
        return self._query(f"SELECT {COLUMNS} FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit))

    def read_organization(self, organization_id: str | None, after: int, up_to: int, limit: int) -> list[tuple]:
        return self._query(f"SELECT {COLUMNS} FROM events WHERE organization_id IS ? AND seq > ? AND seq <= ?"
                           " ORDER BY seq LIMIT ?", (organization_id, after, up_to, limit))

    def organizations(self) -> list[str | None]:
        # One index probe per value (a skip scan), not a pass over the events.
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
        return {route: seq for route, seq in self._query("SELECT route, seq FROM applied")}

    def mark_applied(self, marks: Mapping[str, int]) -> None:
        if not self.path.exists():  # no inbox file: there are no events to mark
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
        rows = self._query("SELECT seq FROM sqlite_sequence WHERE name = 'events'")
        return int(rows[0][0]) if rows else 0

    def count(self) -> int:
        rows = self._query("SELECT count(*) FROM events")
        return int(rows[0][0]) if rows else 0
