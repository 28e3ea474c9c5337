"""Which organizations have changes ready to send, and from when: the delivery sensor's view of the ledger.

The ledger itself (``change_sets``) is in DuckDB, which a sensor must never open (it runs in Dagster's long-lived
code server, and DuckDB admits one process at a time). So whoever changes what is ready to send — the change-set
asset, a delivery run with failures to retry later, ``scim-pipeline approve`` and ``retry`` — also marks it here, in
a small SQLite file the sensor can read at any time.

A delivery that starts claims the marks of its organizations as a lease: they are due again when the lease runs
out (``DEFAULT_LEASE``), unless the delivery releases them. A delivery that finishes an organization releases it
(having marked again what it leaves for later); one that dies — the process killed, the warehouse busy, a bug —
leaves the mark to come due again, so the sensor sends those changes without waiting for the next provisioning run.
"""

from __future__ import annotations

import sqlite3
import uuid
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

DEFAULT_LEASE = timedelta(minutes=5)  # longer than a delivery of one organization takes, retries included

_SCHEMA = """
CREATE TABLE IF NOT EXISTS ready (
    organization_id TEXT PRIMARY KEY,
    ready_at TEXT,  -- ISO UTC: deliver this organization at or after this time (NULL: only a lease holds the row)
    lease TEXT,  -- the claim of the delivery working on it
    leased_until TEXT  -- ISO UTC: when the claim runs out and the organization is due again
)
"""


@dataclass(frozen=True)
class Lease:
    token: str
    organizations: list[str]  # the organizations claimed that were due


class OutboxIndex:
    def __init__(self, path: Path):
        self.path = Path(path)

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute(_SCHEMA)
        if "lease" not in {row[1] for row in con.execute("PRAGMA table_info(ready)")}:
            _upgrade(con)
        return con

    def mark_ready(self, organization_ids: list[str], at: datetime) -> None:
        """Ready at ``at``, or earlier if already marked earlier. A mark made during a lease outlives it."""
        if not organization_ids:
            return
        with closing(self._connect()) as con:
            con.executemany(
                """INSERT INTO ready (organization_id, ready_at) VALUES (?, ?)
                   ON CONFLICT (organization_id) DO UPDATE
                   SET ready_at = coalesce(min(ready_at, excluded.ready_at), excluded.ready_at)""",
                [(org, at.isoformat()) for org in organization_ids],
            )

    def due(self, now: datetime) -> list[str]:
        if not self.path.exists():
            return []
        with closing(self._connect()) as con:
            at = now.isoformat()
            rows = con.execute(
                "SELECT organization_id FROM ready WHERE ready_at <= ? OR leased_until <= ? ORDER BY 1", (at, at))
            return [r[0] for r in rows]

    def claim(self, organization_ids: list[str], now: datetime, due_only: bool = True,
              lease_for: timedelta = DEFAULT_LEASE) -> Lease:
        """A delivery starting: lease the marks of these organizations that are due (``due_only``) or all their
        marks (a delivery that sends whatever is ready now; it marks again what it leaves for later) until ``now +
        lease_for``. The lease's ``organizations`` are those that were due."""
        wanted = set(organization_ids)
        token = uuid.uuid4().hex
        at = now.isoformat()
        with closing(self._connect()) as con:
            con.execute("BEGIN IMMEDIATE")
            marks = {org: (ready_at, until) for org, ready_at, until in
                     con.execute("SELECT organization_id, ready_at, leased_until FROM ready").fetchall()}
            due = sorted(org for org, (ready_at, until) in marks.items() if org in wanted
                         and ((ready_at is not None and ready_at <= at) or (until is not None and until <= at)))
            taken = due if due_only else sorted(wanted & set(marks))
            con.executemany(
                "UPDATE ready SET ready_at = NULL, lease = ?, leased_until = ? WHERE organization_id = ?",
                [(token, (now + lease_for).isoformat(), org) for org in taken],
            )
            con.execute("COMMIT")
        return Lease(token, due)

    def release(self, lease: Lease, organization_ids: list[str] | None = None) -> None:
        """The delivery is done with these organizations (default: all it claimed): drop their marks, unless marked
        again since the claim. A lease another delivery has taken over since releases nothing."""
        with closing(self._connect()) as con:
            con.execute("BEGIN IMMEDIATE")
            if organization_ids is None:
                con.execute("UPDATE ready SET lease = NULL, leased_until = NULL WHERE lease = ?", (lease.token,))
            else:
                con.executemany(
                    "UPDATE ready SET lease = NULL, leased_until = NULL WHERE lease = ? AND organization_id = ?",
                    [(lease.token, org) for org in organization_ids],
                )
            con.execute("DELETE FROM ready WHERE ready_at IS NULL AND lease IS NULL")
            con.execute("COMMIT")

    def next_ready_at(self) -> datetime | None:
        if not self.path.exists():
            return None
        with closing(self._connect()) as con:
            row = con.execute("SELECT min(coalesce(min(ready_at, leased_until), ready_at, leased_until)) "
                              "FROM ready").fetchone()
            return datetime.fromisoformat(row[0]) if row and row[0] else None


def _upgrade(con: sqlite3.Connection) -> None:
    """An index written before leases: its marks move into the table with lease columns (ready_at may be NULL)."""
    con.execute("BEGIN IMMEDIATE")
    if "lease" not in {row[1] for row in con.execute("PRAGMA table_info(ready)")}:  # another process may have done it
        con.execute("ALTER TABLE ready RENAME TO ready_before_leases")
        con.execute(_SCHEMA)
        con.execute("INSERT INTO ready (organization_id, ready_at) SELECT organization_id, ready_at "
                    "FROM ready_before_leases")
        con.execute("DROP TABLE ready_before_leases")
    con.execute("COMMIT")
