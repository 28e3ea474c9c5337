"""The DuckDB warehouse file and its connections.

DuckDB admits one process at a time on a file, so every connection here is short-lived, and this class fixes what
``dagster_duckdb.DuckDBResource`` lacks: a locked file is retried with jitter for a bounded time (the shared retry
policy), readers open read-only, and the lock is always released (closed in ``finally``).

``write()`` is one transaction. Work that commits several times — a full sync writes each organization in a
transaction of its own — takes a ``session()`` and opens each ``transaction(con)`` itself.

Writers of several processes take ``Turns``: a long piece of work (a full sync, which spends most of its time
listing Scalekit) holds the warehouse for one short write at a time, and lets whoever waits write in between.
"""

from __future__ import annotations

import logging
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import duckdb

from scim_pipeline.lib.retry import RetryPolicy
from scim_pipeline.warehouse.schema import create_all


class WarehouseBusy(Exception):
    """The warehouse stayed locked by another process for the whole retry budget."""


def _is_lock_error(exc: BaseException) -> bool:
    return isinstance(exc, duckdb.IOException) and "lock" in str(exc).lower()


_HOLDER_RE = re.compile(r"held in (?P<exe>.+?) \(PID (?P<pid>\d+)\)")


def _holder(exc: BaseException) -> str:
    """Which process holds the file, as DuckDB's lock error names it (it does where the system tells it)."""
    match = _HOLDER_RE.search(str(exc))
    if match is None:
        return "another process"
    return f"another process (PID {match['pid']}, {Path(match['exe']).name})"


log = logging.getLogger(__name__)
SAY_AFTER_S = 2.0  # a wait longer than one organization's write is worth a line

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


class Turns:
    """Turns at writing the warehouse, for work that writes many times with other work in between. This one is for
    a writer alone: always its turn, nobody waiting. The Dagster layer hands out the ``warehouse`` pool's slot, in
    the order it was asked for (``defs/warehouse_pool.PoolTurns``)."""

    @contextmanager
    def turn(self) -> Iterator[None]:
        """Hold the warehouse for one write (a session, a few transactions): wait for it, and let go after."""
        yield

    def others_waiting(self) -> bool:
        """Whether another writer waits for a turn now: then let go after the current transaction."""
        return False


class Warehouse:
    """``on_wait`` is told, once per connection that waits longer than ``SAY_AFTER_S``, which process holds the
    file."""

    def __init__(self, path: Path | str, lock_timeout_s: float = 120.0,
                 on_wait: Callable[[str], None] | None = None):
        self.path = Path(path).resolve()
        self.lock_timeout_s = lock_timeout_s
        self.on_wait = on_wait or log.warning

    def _connect(self, read_only: bool, timeout_s: float) -> duckdb.DuckDBPyConnection:
        # Short first waits (the lock is usually held for one organization's write), growing to half a second.
        policy = RetryPolicy(attempts=None, deadline_s=timeout_s, base_s=0.02, max_delay_s=0.5)
        told, started = False, time.monotonic()

        def waiting(exc: BaseException, _delay: float) -> None:
            nonlocal told
            if not told and time.monotonic() - started >= SAY_AFTER_S:  # not for the usual brief contention
                told = True
                self.on_wait(f"Waiting for {self.path.name}: it is locked by {_holder(exc)}; "
                             f"giving up after {timeout_s:g}s")

        try:
            return policy.call(lambda: duckdb.connect(str(self.path), read_only=read_only), retry_if=_is_lock_error,
                               on_retry=waiting)
        except duckdb.IOException as exc:
            if _is_lock_error(exc):
                raise WarehouseBusy(
                    f"warehouse {self.path.name} stayed locked by {_holder(exc)} for {timeout_s:g}s"
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
