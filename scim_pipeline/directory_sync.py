"""Full directory sync of organizations: list from Scalekit (concurrently, to spool files), then load each
organization into the warehouse in its own transaction. Plain functions; the Dagster assets call them."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from scim_pipeline.resources.scalekit import DirectoryAPI, ScalekitError
from scim_pipeline.resources.warehouse import Warehouse
from scim_pipeline.warehouse.directory import SnapshotCounts, Spool, load_snapshot, upsert_directories

log = logging.getLogger(__name__)


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class NoDirectory(Exception):
    """The organization has no enabled directory: nothing to sync (not an error of the pipeline)."""


def list_organization(api: DirectoryAPI, organization_id: str, spool_root: Path) -> Spool:
    """Stream one organization's enabled directories, users and groups to a spool."""
    spool = Spool.create(spool_root, organization_id, listed_at=utcnow())
    directories = api.directories(organization_id)
    spool.directories = directories
    enabled = [d for d in directories if d["enabled"]]
    if not enabled:
        raise NoDirectory(f"{organization_id} has no enabled directory")
    for directory in enabled:
        for page in api.group_pages(organization_id, directory["directory_id"]):
            spool.add_groups(page)
        for page in api.user_pages(organization_id, directory["directory_id"]):
            spool.add_users(page)
    return spool


@dataclass
class SyncReport:
    synced: dict[str, SnapshotCounts] = field(default_factory=dict)
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
) -> SyncReport:
    """List every organization (``workers`` at a time) and load each as soon as it is listed.

    One organization failing (or having no directory) never stops the others; a Scalekit that refuses our
    credentials or cannot be reached at all is raised at once, since no organization can succeed."""
    report = SyncReport()
    api.client  # authenticate once up front: bad credentials or an unreachable Scalekit fail here, clearly
    total = len(organization_ids)
    with ThreadPoolExecutor(max_workers=max(1, min(workers, total or 1))) as pool:
        futures = {pool.submit(list_organization, api, org, spool_root): org for org in organization_ids}
        for future in as_completed(futures):
            org = futures[future]
            try:
                spool = future.result()
            except NoDirectory as exc:
                report.skipped[org] = str(exc)
                progress(f"[{len(report.synced) + len(report.skipped) + len(report.failed)}/{total}] {org}: skipped ({exc})")
                continue
            except ScalekitError as exc:
                report.failed[org] = str(exc)
                progress(f"[{len(report.synced) + len(report.skipped) + len(report.failed)}/{total}] {org}: FAILED: {exc}")
                continue
            try:
                # Listing goes on in the pool while this thread holds the warehouse for one short transaction.
                with warehouse.write() as con:
                    upsert_directories(con, spool.directories, utcnow())
                    counts = load_snapshot(con, spool, utcnow())
            finally:
                spool.remove()
            report.synced[org] = counts
            progress(
                f"[{len(report.synced) + len(report.skipped) + len(report.failed)}/{total}] {org}: "
                f"{counts.users} users (+{counts.users_new} ~{counts.users_changed} -{counts.users_deleted}), "
                f"{counts.groups} groups"
            )
    return report
