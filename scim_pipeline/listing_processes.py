"""Listing organizations in worker processes, each with its own threads: an executor for ``list_organization``.

Turning each user's protobuf into a warehouse record is Python work (about 30 us a user, its SCIM detail converted in
C) that holds the GIL: with threads alone, one GIL serializes it with every page's gRPC handling while a second core
sits idle. Worker processes (spawned: the parent runs gRPC threads, which do not survive a fork) list
organizations concurrently with the warehouse load in the parent, and use every core. Each has its own SDK client
and ``threads`` threads, because listing is also latency-bound: one call in flight per thread.

Starting a worker takes about a second (Python, then the SDK's imports and its login), which the parent does not
wait out: each of its own ``processes * threads`` threads lists one organization meanwhile, with the SDK client it
already has. A semaphore shared by every process keeps the organizations listed at once within that number.

The parent sees ordinary futures (``submit(org) -> Future[Spool]``) that raise what ``list_organization`` raised
(``NoDirectory``, ``ScalekitError``), so ``sync_organizations`` treats threads and processes alike. A worker that
dies (killed, out of memory) fails the organizations still outstanding rather than leave them waiting forever, and
a worker whose parent died exits.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from scim_pipeline.directory_api import Backoff, DirectoryAPI, ScalekitError

log = logging.getLogger(__name__)

_POLL_S = 0.5  # how often the collector checks that the workers are alive while it waits
GIL_SWITCH_S = 0.0005


class ListingFailed(Exception):
    """A listing ended with an error that is neither Scalekit's nor a missing directory (a bug): the sync raises it,
    as it raises what a listing thread raised."""


def _worker(config, backoff: Backoff, spool_root: Path, threads: int, tasks, results, slots) -> None:
    """A worker process: ``threads`` threads take organization ids from ``tasks`` until a None each."""
    from scim_pipeline.directory_sync import NoDirectory, list_organization  # not at import: circular

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent stops the workers
    # A page's reply waits for the GIL while another thread converts its own page: hand the GIL over every 0.5 ms
    # rather than Python's 5, so that replies are not held up behind conversions (a worker is ours alone to tune).
    sys.setswitchinterval(GIL_SWITCH_S)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    api = DirectoryAPI(config, backoff)

    def work() -> None:
        while (org := tasks.get()) is not None:
            try:
                with slots:
                    results.put((org, "ok", list_organization(api, org, spool_root)))
            except NoDirectory as exc:
                results.put((org, "skipped", str(exc)))
            except ScalekitError as exc:
                results.put((org, "failed", str(exc)))
            except Exception:  # noqa: BLE001 - reported to the parent, which raises it as the thread pool would
                results.put((org, "error", traceback.format_exc(limit=8)))

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="listing") as pool:
        for _ in range(threads):
            pool.submit(work)


def _exit_with_parent(parent: int) -> None:
    """A worker whose parent died (killed with SIGKILL, say) would wait for tasks forever: end it instead."""
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)


class ListingProcesses:
    """``processes`` worker processes with ``threads`` listing threads each; use as a context manager."""

    def __init__(self, api: DirectoryAPI, spool_root: Path, processes: int, threads: int):
        ctx = multiprocessing.get_context("spawn")
        self._tasks = ctx.Queue()
        self._results = ctx.Queue()
        self._slots = ctx.BoundedSemaphore(processes * threads)  # organizations listed at once, all processes
        self._futures: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._threads = threads
        self._processes = [
            ctx.Process(target=_worker, args=(api.config, api.backoff, spool_root, threads, self._tasks,
                                              self._results, self._slots), name=f"scim-pipeline listing {i + 1}")
            for i in range(processes)
        ]
        for process in self._processes:
            process.start()
        self._collector = threading.Thread(target=self._collect, name="listing-results", daemon=True)
        self._closing = False
        self._collector.start()
        self._starters = ThreadPoolExecutor(max_workers=processes * threads, thread_name_prefix="listing-start")
        for _ in range(processes * threads):
            self._starters.submit(self._list_one_here, api, spool_root)

    def submit(self, organization_id: str) -> Future:
        future: Future = Future()
        with self._lock:
            self._futures[organization_id] = future
        self._tasks.put(organization_id)
        return future

    def _list_one_here(self, api: DirectoryAPI, spool_root: Path) -> None:
        """List one organization in this process, while the workers start."""
        from scim_pipeline.directory_sync import list_organization

        try:
            org = self._tasks.get(timeout=_POLL_S)
        except queue.Empty:  # nothing submitted yet: the workers will take what comes
            return
        with self._lock:
            future = self._futures.pop(org, None)
        if future is None:  # failed already (a worker died)
            return
        try:
            with self._slots:
                future.set_result(list_organization(api, org, spool_root))
        except BaseException as exc:  # NoDirectory, ScalekitError or a bug: raised to the sync, as from a worker
            future.set_exception(exc)

    def _collect(self) -> None:
        from scim_pipeline.directory_sync import NoDirectory

        while True:
            try:
                org, kind, value = self._results.get(timeout=_POLL_S)
            except queue.Empty:
                if self._closing and not self._futures:
                    return
                dead = [p for p in self._processes if p.exitcode not in (None, 0)]
                if dead and self._futures:
                    self._fail_outstanding(f"a listing process exited with code {dead[0].exitcode}")
                if all(p.exitcode is not None for p in self._processes):
                    return
                continue
            with self._lock:
                future = self._futures.pop(org, None)
            if future is None:
                continue
            if kind == "ok":
                future.set_result(value)
            elif kind == "skipped":
                future.set_exception(NoDirectory(value))
            elif kind == "failed":
                future.set_exception(ScalekitError(value))
            else:
                future.set_exception(ListingFailed(f"listing {org} failed in a worker process:\n{value}"))

    def _fail_outstanding(self, why: str) -> None:
        """Fail every organization not yet listed (which were the dead worker's is unknown) and take the rest off
        the queue, so that the survivors stop too; the next sync lists them."""
        with self._lock:
            pending, self._futures = self._futures, {}
        try:
            while True:
                self._tasks.get_nowait()
        except queue.Empty:
            pass
        log.error("%s; %d organization(s) not listed", why, len(pending))
        for future in pending.values():
            future.set_exception(ScalekitError(f"{why}; listed again by the next sync"))

    def __enter__(self) -> "ListingProcesses":
        return self

    def __exit__(self, *exc) -> None:
        self._closing = True
        self._starters.shutdown(wait=True)  # before the workers' stop sentinels, so that no starter takes one
        for _ in range(len(self._processes) * self._threads):
            self._tasks.put(None)
        if exc[0] is not None:  # the parent is failing: do not wait for listings nobody will load
            for process in self._processes:
                process.terminate()
        for process in self._processes:
            process.join()
        self._tasks.cancel_join_thread()  # sentinels a dead worker never took must not hold up this process's exit
        self._collector.join()
