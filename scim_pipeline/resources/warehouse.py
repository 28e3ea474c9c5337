"""The DuckDB warehouse as a resource, with the three fixes ARCHITECTURE asks of ``dagster_duckdb``:
retry a locked file with jitter (bounded), open read-only for readers, and always release the lock (close in
``finally``). DuckDB admits one process at a time on a file, so every connection here is short-lived."""

from __future__ import annotations

import random
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import dagster as dg
import duckdb

from scim_pipeline.config import settings
from scim_pipeline.warehouse.schema import create_all


class WarehouseBusy(Exception):
    """The warehouse stayed locked by another process for the whole retry budget."""


def _is_lock_error(exc: Exception) -> bool:
    return "lock" in str(exc).lower()


_SCHEMA_READY: set[Path] = set()  # files whose schema this process has already brought up to date


class Warehouse:
    def __init__(self, path: Path | str, lock_timeout_s: float = 120.0):
        self.path = Path(path).resolve()
        self.lock_timeout_s = lock_timeout_s

    def _connect(self, read_only: bool, timeout_s: float) -> duckdb.DuckDBPyConnection:
        deadline = time.monotonic() + timeout_s
        delay = 0.02
        while True:
            try:
                return duckdb.connect(str(self.path), read_only=read_only)
            except duckdb.IOException as exc:
                if not _is_lock_error(exc) or time.monotonic() >= deadline:
                    if _is_lock_error(exc):
                        raise WarehouseBusy(
                            f"warehouse {self.path.name} stayed locked by another process for {timeout_s:.0f}s"
                        ) from exc
                    raise
            # Full jitter, so that two waiting processes do not retry in lockstep.
            time.sleep(random.uniform(0, delay))
            delay = min(delay * 2, 0.5)

    @contextmanager
    def write(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A writing connection inside one transaction: committed on success, rolled back on error, always closed."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():  # a new (or deleted and re-created) file needs its schema again
            _SCHEMA_READY.discard(self.path)
        con = self._connect(read_only=False, timeout_s=self.lock_timeout_s)
        try:
            if self.path not in _SCHEMA_READY:
                create_all(con)
                _SCHEMA_READY.add(self.path)
            con.execute("BEGIN TRANSACTION")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")
        finally:
            con.close()

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


class WarehouseResource(dg.ConfigurableResource):
    """DuckDB at ``SCIM_PIPELINE_HOME/warehouse.duckdb`` unless ``path`` is given."""

    path: str | None = None
    lock_timeout_s: float = 120.0

    def warehouse(self) -> Warehouse:
        return Warehouse(self.path or settings().warehouse_path, self.lock_timeout_s)
