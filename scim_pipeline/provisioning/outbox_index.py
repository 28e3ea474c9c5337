"""Which organizations have changes ready to send, and from when: the delivery sensor's view of the ledger.

The ledger itself (``change_sets``) is in DuckDB, which a sensor must never open (it runs in Dagster's long-lived
code server, and DuckDB admits one process at a time). So whoever changes what is ready to send — the change-set
asset, a delivery run with failures to retry later, ``scim-pipeline approve`` — also marks it here, in a small
SQLite file the sensor can read at any time.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from datetime import datetime
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS ready (
    organization_id TEXT PRIMARY KEY,
    ready_at TEXT NOT NULL  -- ISO UTC: deliver this organization at or after this time
)
"""


class OutboxIndex:
    def __init__(self, path: Path):
        self.path = Path(path)

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute(_SCHEMA)
        return con

    def mark_ready(self, organization_ids: list[str], at: datetime) -> None:
        """Ready at ``at``, or earlier if already marked earlier."""
        if not organization_ids:
            return
        with closing(self._connect()) as con:
            con.executemany(
                """INSERT INTO ready VALUES (?, ?)
                   ON CONFLICT (organization_id) DO UPDATE SET ready_at = min(ready_at, excluded.ready_at)""",
                [(org, at.isoformat()) for org in organization_ids],
            )

    def due(self, now: datetime) -> list[str]:
        if not self.path.exists():
            return []
        with closing(self._connect()) as con:
            rows = con.execute("SELECT organization_id FROM ready WHERE ready_at <= ? ORDER BY 1", (now.isoformat(),))
            return [r[0] for r in rows]

    def claim(self, organization_ids: list[str], now: datetime, due_only: bool = True) -> list[str]:
        """A delivery starting: take the marks of these organizations that are due (``due_only``) or all their marks
        (a delivery that sends whatever is ready now; it marks again what it leaves for later). Returns those that
        were due."""
        wanted = set(organization_ids)
        with closing(self._connect()) as con:
            con.execute("BEGIN IMMEDIATE")
            marks = dict(con.execute("SELECT organization_id, ready_at FROM ready").fetchall())
            due = sorted(org for org, at in marks.items() if org in wanted and at <= now.isoformat())
            taken = due if due_only else sorted(wanted & set(marks))
            con.executemany("DELETE FROM ready WHERE organization_id = ?", [(org,) for org in taken])
            con.execute("COMMIT")
            return due

    def next_ready_at(self) -> datetime | None:
        if not self.path.exists():
            return None
        with closing(self._connect()) as con:
            row = con.execute("SELECT min(ready_at) FROM ready").fetchone()
            return datetime.fromisoformat(row[0]) if row and row[0] else None
