"""Directory snapshots into the warehouse.

Listing an organization streams its pages to a spool of NDJSON files (so memory stays flat whatever the directory's
size, and no warehouse lock is held while Scalekit is called); loading spools is one short transaction for one
large organization or a batch of small ones that stages the rows, then replaces those organizations' rows: upserts,
tombstones for users and groups that left, and the raw memberships. Rows changed by a webhook event newer than the
listing are left alone.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

import duckdb

from scim_pipeline.scalekit import ids
from scim_pipeline.scalekit.records import Page

USER_COLUMNS = {
    "user_id": "VARCHAR", "organization_id": "VARCHAR", "directory_id": "VARCHAR", "email": "VARCHAR",
    "given_name": "VARCHAR", "family_name": "VARCHAR", "preferred_username": "VARCHAR", "active": "BOOLEAN",
    "emails": "JSON", "groups": "STRUCT(id VARCHAR, name VARCHAR)[]", "updated_at": "TIMESTAMP", "detail": "JSON",
}
GROUP_COLUMNS = {
    "group_id": "VARCHAR", "organization_id": "VARCHAR", "directory_id": "VARCHAR", "display_name": "VARCHAR",
    "total_users": "INTEGER", "updated_at": "TIMESTAMP", "detail": "JSON",
}


WRITE_BUFFER = 1 << 20  # bytes a spool file gathers before a write: about 700 users


@dataclass
class Spool:
    """One organization's listing on disk: ``root/<organization id>/`` holds users.ndjson and groups.ndjson,
    written page by page."""

    root: Path
    organization_id: str
    listed_at: datetime
    users: int = 0
    groups: int = 0
    directories: list[dict] = field(default_factory=list)
    # Scalekit no longer knows the organization: loading this (empty) spool tombstones everything it had.
    deleted: bool = False
    # Open while listing: opening the file for each page cost more than writing it.
    _writers: dict[str, BinaryIO] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def create(cls, root: Path, organization_id: str, listed_at: datetime) -> "Spool":
        """An empty spool for the organization; a listing an earlier run left there is removed first."""
        folder = _inside(root, ids.ORGANIZATION.check(organization_id))
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        (folder / "users.ndjson").touch()
        (folder / "groups.ndjson").touch()
        return cls(root, organization_id, listed_at)

    @property
    def folder(self) -> Path:
        return self.root / self.organization_id

    def _append(self, name: str, page: Page) -> int:
        if page.count:
            if (writer := self._writers.get(name)) is None:
                writer = self._writers[name] = open(self.folder / name, "ab", buffering=WRITE_BUFFER)
            writer.write(page.lines)
        return page.count

    def close(self) -> None:
        """Flush and close the files: when the listing ends, and before loading them."""
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()

    def add_users(self, page: Page) -> None:
        self.users += self._append("users.ndjson", page)

    def add_groups(self, page: Page) -> None:
        self.groups += self._append("groups.ndjson", page)

    def remove(self) -> None:
        shutil.rmtree(_inside(self.root, self.organization_id), ignore_errors=True)


OWNER_LOCK = ".owner"  # held (flock) by the sync a spool folder belongs to, for as long as it runs
UNLOCKED_GRACE_S = 60


@contextmanager
def sync_spool(spool_root: Path) -> Iterator[Path]:
    """A folder of this sync's own under ``spool_root`` for its spools, removed when the sync ends.

    Two syncs may list the same organization at once (a reconciliation and ``scim-pipeline sync``): in a shared
    folder, one would remove or truncate the spool the other is writing. A sync killed before its end leaves its
    folder; the next sync removes every folder whose owner's lock is free, since the kernel frees a lock when its
    process dies."""
    spool_root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="sync-", dir=spool_root))
    owner = os.open(folder / OWNER_LOCK, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(owner, fcntl.LOCK_EX)
        _remove_abandoned(spool_root, keep=folder)
        yield folder
    finally:
        os.close(owner)
        shutil.rmtree(folder, ignore_errors=True)


def _remove_abandoned(spool_root: Path, keep: Path) -> None:
    for folder in spool_root.iterdir():
        if folder == keep or folder.is_symlink() or not folder.is_dir():
            continue
        lock = folder / OWNER_LOCK
        if not lock.exists():
            # A sync creates its folder, then its lock: a folder without one is a moment old (left alone) or was
            # left long ago (by a sync that died in between, or a version that shared one folder for all syncs).
            try:
                if time.time() - folder.stat().st_mtime > UNLOCKED_GRACE_S:
                    shutil.rmtree(folder, ignore_errors=True)
            except FileNotFoundError:
                pass
            continue
        try:
            probe = os.open(lock, os.O_RDONLY)
        except OSError:
            continue  # its owner removed it meanwhile
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # its sync runs
        else:
            shutil.rmtree(folder, ignore_errors=True)
        finally:
            os.close(probe)


def _inside(root: Path, name: str) -> Path:
    """``root/name``, resolved, refused unless it is a folder directly inside ``root``: nothing under
    SCIM_PIPELINE_HOME outside the spool is ever removed, whatever a name or a symbolic link says."""
    root = root.resolve()
    folder = (root / name).resolve()
    if folder.parent != root:
        raise ValueError(f"spool folder {ids.shown(name)} is not inside {root}")
    return folder


def _read_json(param: str, columns: dict[str, str]) -> str:
    """``read_json`` of the files named by the query parameter ``param`` (a list), each row with the ``filename``
    it came from: a path is never spliced into SQL."""
    cols = ", ".join(f"'{k}': '{v}'" for k, v in columns.items())
    return f"read_json(${param}, format='newline_delimited', columns={{{cols}}}, filename=true)"


# A row is the snapshot's to overwrite (or tombstone) unless a webhook event newer than its organization's listing
# changed it; ``listed_at`` is the staged row's (or the staged organization's) listing time.
FRESH = "(t.event_at IS NULL OR t.event_at < {listed}.listed_at)"


@dataclass
class SnapshotCounts:
    users: int = 0
    users_new: int = 0
    users_changed: int = 0
    users_deleted: int = 0
    groups: int = 0
    groups_new: int = 0
    groups_changed: int = 0
    groups_deleted: int = 0
    memberships: int = 0


def load_snapshot(con: duckdb.DuckDBPyConnection, spool: Spool, synced_at: datetime) -> SnapshotCounts:
    """Replace one organization's directory rows with its spooled snapshot. Call inside a transaction."""
    return load_snapshots(con, [spool], synced_at)[spool.organization_id]


def load_snapshots(con: duckdb.DuckDBPyConnection, spools: list[Spool], synced_at: datetime
                   ) -> dict[str, SnapshotCounts]:
    """Replace these organizations' directory rows with their spooled snapshots, in the same statements for all of
    them: about twenty statements whether they are one organization or a hundred, which is what a small
    organization's load costs. Call inside a transaction. Returns each organization's counts."""
    for spool in spools:
        spool.close()
    orgs = [spool.organization_id for spool in spools]
    counts = {org: SnapshotCounts() for org in orgs}
    files = {"users_path": [str(spool.folder / "users.ndjson") for spool in spools],
             "groups_path": [str(spool.folder / "groups.ndjson") for spool in spools]}
    # Which organization a staged row belongs to, and as of when, comes from the spool it was read from.
    con.execute(
        """CREATE OR REPLACE TEMP TABLE stage_listed AS
           SELECT unnest($orgs) AS organization_id, unnest($listed_at)::TIMESTAMP AS listed_at,
                  unnest($users_path) AS users_path, unnest($groups_path) AS groups_path""",
        {"orgs": orgs, "listed_at": [spool.listed_at for spool in spools], **files},
    )
    for stage, columns, path in (("stage_users", USER_COLUMNS, "users_path"),
                                 ("stage_groups", GROUP_COLUMNS, "groups_path")):
        con.execute(
            f"""CREATE OR REPLACE TEMP TABLE {stage} AS
                SELECT r.* EXCLUDE (filename), l.organization_id AS spool_org, l.listed_at
                FROM {_read_json('paths', columns)} r JOIN stage_listed l ON l.{path} = r.filename""",
            {"paths": files[path]},
        )
    _once_each(con, "stage_users", "user_id")
    _once_each(con, "stage_groups", "group_id")
    for stage, field_name in (("stage_users", "users"), ("stage_groups", "groups")):
        for org, n in con.execute(f"SELECT spool_org, count(*) FROM {stage} GROUP BY 1").fetchall():
            setattr(counts[org], field_name, n)

    # Comparing every column of the existing rows would scan the whole table (the SCIM detail of every user of
    # every organization). An organization's rows sit together, and so do those of organizations synced together:
    # first find where the snapshot's users are (one narrow column), then read the wide columns of that range only.
    lo, hi = con.execute(
        "SELECT coalesce(min(t.rowid), 0), coalesce(max(t.rowid), -1) FROM directory_users t "
        "SEMI JOIN stage_users s USING (user_id)"
    ).fetchone()
    fresh = FRESH.format(listed="s")
    for org, new, changed in con.execute(
        f"""
        SELECT s.spool_org,
               count(*) FILTER (WHERE t.user_id IS NULL),
               count(*) FILTER (WHERE t.user_id IS NOT NULL AND {fresh} AND (
                   t.deleted_at IS NOT NULL OR t.email IS DISTINCT FROM s.email
                   OR t.given_name IS DISTINCT FROM s.given_name OR t.family_name IS DISTINCT FROM s.family_name
                   OR t.preferred_username IS DISTINCT FROM s.preferred_username OR t.active IS DISTINCT FROM s.active
                   OR t.detail::VARCHAR IS DISTINCT FROM s.detail::VARCHAR))
        FROM stage_users s
        LEFT JOIN (SELECT * FROM directory_users WHERE rowid BETWEEN $lo AND $hi) t USING (user_id)
        GROUP BY 1
        """,
        {"lo": lo, "hi": hi},
    ).fetchall():
        counts[org].users_new, counts[org].users_changed = new, changed
    # The upsert as an UPDATE of the rows found above, then an INSERT of the rest: DuckDB's INSERT ... ON CONFLICT
    # keeps the whole batch in memory (a directory of 200,000 users did not fit in 200 MB), these two spill.
    con.execute(
        f"""
        UPDATE directory_users AS t SET
            organization_id = s.organization_id, directory_id = s.directory_id, email = s.email,
            given_name = s.given_name, family_name = s.family_name, preferred_username = s.preferred_username,
            active = s.active, emails = s.emails, updated_at = s.updated_at, detail = s.detail, deleted_at = NULL,
            synced_at = $synced_at, event_at = NULL, event_nanos = NULL, event_seq = NULL
        FROM stage_users s
        WHERE t.user_id = s.user_id AND t.rowid BETWEEN $lo AND $hi AND {fresh}
        """,
        {"synced_at": synced_at, "lo": lo, "hi": hi},
    )
    con.execute(
        """
        INSERT INTO directory_users (user_id, organization_id, directory_id, email, given_name, family_name,
            preferred_username, active, emails, updated_at, detail, deleted_at, synced_at, event_at)
        SELECT user_id, organization_id, directory_id, email, given_name, family_name, preferred_username, active,
               emails, updated_at, detail, NULL, $synced_at, NULL
        FROM stage_users s
        WHERE NOT EXISTS (SELECT 1 FROM directory_users t WHERE t.rowid BETWEEN $lo AND $hi AND t.user_id = s.user_id)
        """,
        {"synced_at": synced_at, "lo": lo, "hi": hi},
    )
    # Deletes are learned from the full snapshot: live users of these organizations absent from it.
    for org, n in _tombstone_absent(con, "directory_users", "user_id", "stage_users", synced_at).items():
        counts[org].users_deleted = n

    for org, new, changed in con.execute(
        f"""
        SELECT s.spool_org, count(*) FILTER (WHERE t.group_id IS NULL),
               count(*) FILTER (WHERE t.group_id IS NOT NULL AND {fresh} AND (t.deleted_at IS NOT NULL
                   OR t.display_name IS DISTINCT FROM s.display_name))
        FROM stage_groups s LEFT JOIN directory_groups t USING (group_id)
        GROUP BY 1
        """
    ).fetchall():
        counts[org].groups_new, counts[org].groups_changed = new, changed
    # An UPDATE and an INSERT, as for users: INSERT ... ON CONFLICT costs about 8 ms a statement however few the
    # groups.
    con.execute(
        f"""
        UPDATE directory_groups AS t SET
            organization_id = s.organization_id, directory_id = s.directory_id, display_name = s.display_name,
            updated_at = s.updated_at, detail = s.detail, deleted_at = NULL, synced_at = $synced_at, event_at = NULL,
            event_nanos = NULL, event_seq = NULL
        FROM stage_groups s
        WHERE t.group_id = s.group_id AND {fresh}
        """,
        {"synced_at": synced_at},
    )
    con.execute(
        """
        INSERT INTO directory_groups (group_id, organization_id, directory_id, display_name, updated_at, detail,
            deleted_at, synced_at, event_at)
        SELECT group_id, organization_id, directory_id, display_name, updated_at, detail, NULL, $synced_at, NULL
        FROM stage_groups s
        WHERE NOT EXISTS (SELECT 1 FROM directory_groups t WHERE t.group_id = s.group_id)
        """,
        {"synced_at": synced_at},
    )
    for org, n in _tombstone_absent(con, "directory_groups", "group_id", "stage_groups", synced_at).items():
        counts[org].groups_deleted = n

    # Raw memberships follow their user's row: replaced wherever the snapshot was allowed to write the user.
    con.execute(
        """
        DELETE FROM directory_user_groups
        WHERE list_contains($orgs, organization_id) AND user_id IN (
            SELECT user_id FROM directory_users WHERE list_contains($orgs, organization_id) AND synced_at = $synced_at)
        """,
        {"orgs": orgs, "synced_at": synced_at},
    )
    # A plain INSERT: these users' memberships were just deleted, and DISTINCT covers a group listed twice on a user;
    # INSERT OR IGNORE's check of every row against the key cost half as much again.
    con.execute(
        """
        INSERT INTO directory_user_groups (organization_id, user_id, group_id)
        SELECT DISTINCT g.organization_id, g.user_id, g.group_id
        FROM (SELECT organization_id, user_id, unnest(groups).id AS group_id FROM stage_users) g
        JOIN directory_users t ON t.user_id = g.user_id AND t.synced_at = $synced_at AND t.deleted_at IS NULL
        """,
        {"synced_at": synced_at},
    )
    for org, n in con.execute(
        "SELECT organization_id, count(*) FROM directory_user_groups WHERE list_contains($orgs, organization_id) "
        "GROUP BY 1", {"orgs": orgs},
    ).fetchall():
        counts[org].memberships = n
    for stage in ("stage_users", "stage_groups", "stage_listed"):
        con.execute(f"DROP TABLE {stage}")
    return counts


def _once_each(con: duckdb.DuckDBPyConnection, stage: str, key: str) -> None:
    """Keep one row per id in a staged listing, the most recently updated. A page token is a position in a
    directory that can change while it is paged through, so a listing may show an entry twice; the warehouse's key
    admits it once."""
    rows, distinct = con.execute(f"SELECT count(*), count(DISTINCT {key}) FROM {stage}").fetchone()
    if rows != distinct:
        con.execute(f"""
            DELETE FROM {stage} WHERE rowid IN (
                SELECT rowid FROM {stage}
                QUALIFY row_number() OVER (PARTITION BY {key} ORDER BY updated_at DESC NULLS LAST, rowid DESC) > 1)
        """)


def _tombstone_absent(con: duckdb.DuckDBPyConnection, table: str, key: str, stage: str,
                      synced_at: datetime) -> dict[str, int]:
    """Set ``deleted_at`` on the staged organizations' live rows missing from their snapshots (unless a webhook
    event newer than the organization's listing changed them); returns how many, by organization."""
    rows = con.execute(
        f"""
        UPDATE {table} AS t SET deleted_at = $synced_at, synced_at = $synced_at, event_at = l.listed_at,
            event_nanos = NULL, event_seq = NULL
        FROM stage_listed l
        WHERE t.organization_id = l.organization_id AND t.deleted_at IS NULL
          AND {FRESH.format(listed="l")}
          AND t.{key} NOT IN (SELECT {key} FROM {stage})
        RETURNING t.organization_id
        """,
        {"synced_at": synced_at},
    ).fetchall()
    deleted: dict[str, int] = {}
    for (org,) in rows:
        deleted[org] = deleted.get(org, 0) + 1
    return deleted


def forget_organization(con: duckdb.DuckDBPyConnection, organization_id: str) -> None:
    """Remove a deleted organization from the catalogue (its row and its directories'). Its users and groups stay,
    tombstoned by loading an empty snapshot: their deletions then go through the change sets and the guard like any
    other, and no 'directory disabled' hold applies to a directory that no longer exists."""
    con.execute("DELETE FROM directories WHERE organization_id = $org", {"org": organization_id})
    con.execute("DELETE FROM organizations WHERE organization_id = $org", {"org": organization_id})


def upsert_organizations(con: duckdb.DuckDBPyConnection, orgs: list[dict], synced_at: datetime) -> None:
    con.execute("CREATE OR REPLACE TEMP TABLE stage_orgs (organization_id VARCHAR, display_name VARCHAR, external_id VARCHAR)")
    if orgs:
        con.executemany(
            "INSERT INTO stage_orgs VALUES (?, ?, ?)",
            [(o["organization_id"], o["display_name"], o["external_id"]) for o in orgs],
        )
    con.execute(
        """
        INSERT OR REPLACE INTO organizations
        SELECT organization_id, display_name, external_id, $synced_at FROM stage_orgs
        """,
        {"synced_at": synced_at},
    )
    con.execute("DROP TABLE stage_orgs")


def upsert_directories(con: duckdb.DuckDBPyConnection, directories: list[dict], synced_at: datetime,
                       listed_at: datetime | dict[str, datetime]) -> None:
    """Replace the directories of the organizations listed (a directory removed in Scalekit disappears).

    ``listed_at`` is when the listing began (one time, or one per organization id), the version of what it says: a
    directory enabled or disabled by a webhook event at or after that time keeps the event's state (the listing may
    predate it), and an event older than the listing is stale from now on."""
    orgs = sorted({d["organization_id"] for d in directories})
    if not orgs:
        return
    as_of = {d["directory_id"]: listed_at[d["organization_id"]] if isinstance(listed_at, dict) else listed_at
             for d in directories}
    directory_ids = [d["directory_id"] for d in directories]
    newer = {row[0]: row[1:] for row in con.execute(
        """
        SELECT directory_id, enabled, event_at, event_nanos, event_seq FROM directories
        WHERE list_contains($ids, directory_id) AND event_at IS NOT NULL
        """,
        {"ids": directory_ids},
    ).fetchall() if row[2] >= as_of[row[0]]}
    # A plain INSERT after deleting by organization and by id: INSERT OR REPLACE costs several times more a row.
    con.execute("DELETE FROM directories WHERE list_contains($orgs, organization_id) OR list_contains($ids, directory_id)",
                {"orgs": orgs, "ids": directory_ids})
    rows = []
    for d in directories:
        enabled, event_at, event_nanos, event_seq = newer.get(d["directory_id"],
                                                              (d["enabled"], as_of[d["directory_id"]], None, None))
        rows.append([d["directory_id"], d["organization_id"], d["name"], d["provider"], d["directory_type"], enabled,
                     json.dumps(d["role_assignments"]), d["total_users"], d["total_groups"], synced_at, event_at,
                     event_nanos, event_seq])
    values = ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"] * len(rows))
    con.execute(
        f"""
        INSERT INTO directories (directory_id, organization_id, name, provider, directory_type, enabled,
            role_assignments, total_users, total_groups, synced_at, event_at, event_nanos, event_seq)
        VALUES {values}
        """,
        [v for row in rows for v in row],
    )
