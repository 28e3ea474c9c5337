"""The DuckDB warehouse file and its connections.

DuckDB admits one process at a time on a file, so every connection here is short-lived, and this class fixes what
``dagster_duckdb.DuckDBResource`` lacks: a locked file is retried with jitter for a bounded time (the shared retry
policy), readers open read-only, and the lock is always released (closed in ``finally``).

``write()`` is one transaction. Work that commits several times — a full sync writes each organization in a
transaction of its own — takes a ``session()`` and opens each ``transaction(con)`` itself.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import duckdb

from scim_pipeline.lib.retry import RetryPolicy
from scim_pipeline.warehouse.schema import create_all


class WarehouseBusy(Exception):
    """The warehouse stayed locked by another process for the whole retry budget."""


def _is_lock_error(exc: BaseException) -> bool:
    return isinstance(exc, duckdb.IOException) and "lock" in str(exc).lower()


_SCHEMA_READY: set[Path] = set()  # files whose schema this process has already brought up to date


@contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """One transaction on ``con``: committed when the block ends, rolled back if it raises."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


class Warehouse:
    def __init__(self, path: Path | str, lock_timeout_s: float = 120.0):
        self.path = Path(path).resolve()
        self.lock_timeout_s = lock_timeout_s

    def _connect(self, read_only: bool, timeout_s: float) -> duckdb.DuckDBPyConnection:
        # Short first waits (the lock is usually held for one organization's write), growing to half a second.
        policy = RetryPolicy(attempts=None, deadline_s=timeout_s, base_s=0.02, max_delay_s=0.5)
        try:
            return policy.call(lambda: duckdb.connect(str(self.path), read_only=read_only), retry_if=_is_lock_error)
        except duckdb.IOException as exc:
            if _is_lock_error(exc):
                raise WarehouseBusy(
                    f"warehouse {self.path.name} stayed locked by another process for {timeout_s:.0f}s"
                ) from exc
            raise

    @contextmanager
    def session(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A writing connection with no transaction of its own (the caller opens ``transaction(con)`` for each
        unit of work); the schema is brought up to date first, and the connection is always closed."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():  # a new (or deleted and re-created) file needs its schema again
            _SCHEMA_READY.discard(self.path)
        con = self._connect(read_only=False, timeout_s=self.lock_timeout_s)
        try:
            if self.path not in _SCHEMA_READY:
                create_all(con)
                _SCHEMA_READY.add(self.path)
            yield con
        finally:
            con.close()

    @contextmanager
    def write(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A writing connection inside one transaction: committed on success, rolled back on error, always closed."""
        with self.session() as con, transaction(con):
            yield con

    @contextmanager
    def read(self, timeout_s: float = 30.0) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-only connection, held only for the caller's query; it never blocks a writer for long."""
        if not self.path.exists():
            with self.write():
                pass  # create the file and its schema, so that a first query finds empty tables
        con = self._connect(read_only=True, timeout_s=timeout_s)
        try:
            yield con
        finally:
            con.close()
