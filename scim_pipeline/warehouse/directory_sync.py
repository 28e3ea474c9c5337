"""Full directory sync of organizations: list from Scalekit (concurrently, to spool files), then load each
organization into the warehouse in its own transaction, holding the warehouse only while it writes (``Turns``).
Plain functions; the Dagster assets call them."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from scim_pipeline.lib.clock import utcnow
from scim_pipeline.scalekit import ids
from scim_pipeline.scalekit.directory_api import DirectoryAPI, NotFound, ScalekitError
from scim_pipeline.warehouse.connection import Turns, transaction
from scim_pipeline.warehouse.directory import (
    SnapshotCounts,
    Spool,
    forget_organization,
    load_snapshots,
    sync_spool,
    upsert_directories,
)

if TYPE_CHECKING:
    from scim_pipeline.warehouse.connection import Warehouse

log = logging.getLogger(__name__)

LOAD_MEMORY_LIMIT = "128MB"
ASK_EVERY_S = 0.2  # how often a turn asks whether another writer waits (a query of Dagster's storage)
LOAD_BATCH_USERS = 2_000  # small organizations loaded in the same statements, up to this many users together
LOAD_THREADS = 1  # per-organization statements are small: a second thread cost more CPU than it saved time


class NoDirectory(Exception):
    """The organization has no enabled directory: nothing to sync (not an error of the pipeline)."""


class ListingStopped(Exception):
    """The sync stopped (it failed, or was told to stop) while this organization was being listed."""


def list_organization(api: DirectoryAPI, organization_id: str, spool_root: Path,
                      stop: threading.Event | None = None) -> Spool:
    """Stream one organization's enabled directories, users and groups to a spool; given up between two pages once
    ``stop`` is set."""
    spool = Spool.create(spool_root, organization_id, listed_at=utcnow())

    def go_on() -> None:
        if stop is not None and stop.is_set():
            raise ListingStopped(organization_id)

    try:
        try:
            directories = api.directories(organization_id)
        except NotFound:
            # Deleted in Scalekit (it lists the directories of every organization it has, even none): an empty
            # listing, so that loading it deprovisions the organization's users, through the guard.
            spool.deleted = True
            return spool
        spool.directories = directories
        enabled = [d for d in directories if d["enabled"]]
        if not enabled:
            raise NoDirectory(f"{organization_id} has no enabled directory")
        for directory in enabled:
            for page in api.group_pages(organization_id, directory["directory_id"]):
                go_on()
                spool.add_groups(page)
            for page in api.user_pages(organization_id, directory["directory_id"]):
                go_on()
                spool.add_users(page)
    except ListingStopped:
        spool.close()
        spool.remove()  # nobody will load it
        raise
    finally:
        spool.close()
    return spool


@dataclass
class SyncReport:
    synced: dict[str, SnapshotCounts] = field(default_factory=dict)  # deleted ones included (everything tombstoned)
    deleted: list[str] = field(default_factory=list)  # organizations Scalekit no longer has
    skipped: dict[str, str] = field(default_factory=dict)  # organization -> why (no directory)
    failed: dict[str, str] = field(default_factory=dict)  # organization -> error

    def total(self, name: str) -> int:
        return sum(getattr(c, name) for c in self.synced.values())


def sync_organizations(
    api: DirectoryAPI,
    warehouse: Warehouse,
    organization_ids: list[str],
    spool_root: Path,
    workers: int = 8,
    progress: Callable[[str], None] = log.info,
    turns: Turns | None = None,
    listing_nice: int = 0,
) -> SyncReport:
    """List every organization (``workers`` at a time, in threads) and load each as soon as it is listed, in a turn
    at the warehouse (``turns``) that ends when no organization is ready to load or another writer waits. The
    listing threads run at CPU niceness ``listing_nice``; this thread, which writes, keeps its own.

    One organization failing (or having no directory) never stops the others; a Scalekit that refuses our
    credentials or cannot be reached at all is raised at once, since no organization can succeed."""
    report = SyncReport()
    api.client  # authenticate once up front: bad credentials or an unreachable Scalekit fail here, clearly
    # An id that is not an organization's (a partition added before ids were checked) names no spool folder.
    for org in organization_ids:
        if not ids.ORGANIZATION.matches(org):
            report.failed[org] = f"not synced: {ids.shown(org)} is not a Scalekit organization id"
    # Once each: two listings of one organization would share its spool folder.
    organization_ids = list(dict.fromkeys(org for org in organization_ids if org not in report.failed))
    total = len(report.failed) + len(organization_ids)
    listed: queue.Queue[Future] = queue.Queue()
    stop = threading.Event()
    turns = turns or Turns()
    said: list[str] = []

    def done() -> int:
        return len(report.synced) + len(report.skipped) + len(report.failed)

    def take(future: Future) -> Spool | None:
        """The listing's spool, or None once a skipped or failed organization is recorded."""
        org = futures[future]
        try:
            return future.result()
        except NoDirectory as exc:
            report.skipped[org] = str(exc)
            said.append(f"[{done()}/{total}] {org}: skipped ({exc})")
        except ScalekitError as exc:
            report.failed[org] = str(exc)
            said.append(f"[{done()}/{total}] {org}: FAILED: {exc}")
        return None

    def load(con, spools: list[Spool]) -> None:
        try:
            # One transaction for the batch, committed before its organizations are reported: an organization
            # reported done survives the process being killed, and a batch that fails half-way leaves every one of
            # its organizations' rows as they were.
            with transaction(con):
                for spool in spools:
                    if spool.deleted:
                        forget_organization(con, spool.organization_id)
                upsert_directories(con, [d for spool in spools for d in spool.directories], utcnow(),
                                   {spool.organization_id: spool.listed_at for spool in spools})
                loaded = load_snapshots(con, spools, utcnow())
        finally:
            for spool in spools:
                spool.remove()
        for spool in spools:
            counts = report.synced[spool.organization_id] = loaded[spool.organization_id]
            if spool.deleted:
                report.deleted.append(spool.organization_id)
            said.append(
                f"[{done()}/{total}] {spool.organization_id}: "
                + ("deleted in Scalekit: " if spool.deleted else "")
                + f"{counts.users} users (+{counts.users_new} ~{counts.users_changed} -{counts.users_deleted}), "
                f"{counts.groups} groups"
            )

    def say() -> None:
        # One message for the organizations of a turn: each message is an event in Dagster's run log, which costs
        # more than writing a small organization.
        if said:
            progress("\n".join(said))
            said.clear()

    put_back: list[Spool] = []  # taken from the queue, left out of a full batch: the first of the next one

    def next_ready() -> Spool | None:
        """An organization already listed, without waiting for one."""
        nonlocal remaining
        if put_back:
            return put_back.pop()
        while remaining:
            try:
                future = listed.get_nowait()
            except queue.Empty:
                return None
            remaining -= 1
            if (spool := take(future)) is not None:
                return spool
        return None

    with sync_spool(spool_root) as own_spool, ThreadPoolExecutor(
            max_workers=max(1, min(workers, total or 1)), thread_name_prefix="listing",
            initializer=_lower_priority, initargs=(listing_nice,)) as lister:
        futures = {lister.submit(list_organization, api, org, own_spool, stop): org for org in organization_ids}
        for future in futures:
            future.add_done_callback(listed.put)
        remaining = len(futures)
        try:
            while remaining or put_back:
                # Listing goes on in the pool while this thread writes. Opening, checkpointing and closing DuckDB
                # costs more than loading a small organization, so every organization already listed is loaded in
                # the same turn and connection, in batches of one transaction each. The turn ends as soon as none is
                # ready (the warehouse is never held while listing) or another writer waits (asked every
                # ASK_EVERY_S): that writer waits for the batch being written (one large organization, or many small
                # ones), and this sync takes its next turn after it.
                if put_back:
                    spool = put_back.pop()
                else:
                    spool = take(listed.get())
                    remaining -= 1
                if spool is None:
                    say()
                    continue
                with turns.turn(), warehouse.session() as con:
                    tune(con)
                    asked, first = time.monotonic(), True
                    while spool is not None:
                        # The organizations already listed go together, up to LOAD_BATCH_USERS users: the
                        # statements of a load cost the same for one small organization as for a hundred.
                        batch, users = [spool], spool.users
                        while users < LOAD_BATCH_USERS and (ready := next_ready()) is not None:
                            if users + ready.users > LOAD_BATCH_USERS:
                                put_back.append(ready)
                                break
                            batch.append(ready)
                            users += ready.users
                        load(con, batch)
                        if first:  # said at once for the turn's first batch, at its end for the others
                            say()
                            first = False
                        if time.monotonic() - asked >= ASK_EVERY_S:
                            if turns.others_waiting():
                                break
                            asked = time.monotonic()
                        spool = next_ready()
                say()
        except BaseException:
            say()
            # List no more organizations that nobody will load, and stop those being listed at their next page:
            # leaving the pool waits for them (a SIGTERM must not wait for whole organizations to be listed).
            stop.set()
            lister.shutdown(wait=False, cancel_futures=True)
            raise
    return report


def _lower_priority(nice: int) -> None:
    """Raise the calling thread's niceness by ``nice``: on Linux a thread's priority is its own (``nice(2)`` acts on
    the calling thread), so the thread that writes, holding the warehouse, keeps its priority."""
    if nice:
        os.nice(nice)


def tune(con) -> None:
    """Bound DuckDB's memory (it spills to a temporary folder beside the warehouse beyond it) and its threads:
    the listing threads share the machine, and a directory of any size must load in a flat footprint."""
    con.execute(f"SET memory_limit = '{LOAD_MEMORY_LIMIT}'")
    con.execute(f"SET threads = {LOAD_THREADS}")
    # Each checkpoint rewrites the touched tables and their indexes: once when the session closes, not every 16 MB.
    con.execute("SET checkpoint_threshold = '256MB'")
