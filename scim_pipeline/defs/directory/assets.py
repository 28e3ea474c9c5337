"""Directory assets: what Scalekit says, in DuckDB.

``organizations`` and ``directories`` are the catalogue (one listing, unpartitioned). ``directory_users`` and
``directory_groups`` are one organization per partition, written together so that no organization is ever
half-written; a run that covers many organizations (a backfill, the reconciliation) is a single run that lists them
concurrently. The same step also runs in ``events`` mode, where it applies the webhook events waiting in the inbox
instead of re-reading the directory: both modes end in the same derived assets.

``directory_snapshot`` takes the ``warehouse`` pool's slot only while it writes (``PoolTurns``), not for the whole
step: a full sync lists Scalekit for minutes, and the webhook path's runs write in between its organizations.
"""


import dagster as dg

from scim_pipeline.config import settings
from scim_pipeline.defs.directory.automation import listing_nice
from scim_pipeline.defs.metadata import count, preview
from scim_pipeline.defs.partitions import WAREHOUSE_POOL, organizations_partitions
from scim_pipeline.defs.resources import ScalekitResource
from scim_pipeline.defs.warehouse_pool import PoolTurns
from scim_pipeline.lib.clock import utcnow
from scim_pipeline.provisioning.change_sets import apply_directory_holds
from scim_pipeline.provisioning.outbox_index import OutboxIndex
from scim_pipeline.receiver.inbox import Inbox
from scim_pipeline.scalekit import ids
from scim_pipeline.scalekit.directory_api import ScalekitError
from scim_pipeline.warehouse.connection import Warehouse
from scim_pipeline.warehouse.directory import upsert_directories, upsert_organizations
from scim_pipeline.warehouse.directory_sync import sync_organizations
from scim_pipeline.warehouse.events import (
    applied_marks,
    apply_events,
    event_from_inbox,
    record_applied,
    unplaced_organizations,
)


@dg.multi_asset(
    specs=[
        dg.AssetSpec("organizations", group_name="directory", kinds={"scalekit", "duckdb"},
                     description="Every organization in the Scalekit environment."),
        dg.AssetSpec("directories", group_name="directory", deps=["organizations"], kinds={"scalekit", "duckdb"},
                     description="Each organization's directories: provider, type, enabled, group-to-role assignments."),
    ],
    pool=WAREHOUSE_POOL,
)
def scalekit_catalog(context: dg.AssetExecutionContext, scalekit: ScalekitResource,
                     warehouse: dg.ResourceParam[Warehouse]):
    api = scalekit.api()
    listed_at = utcnow()  # what the listing says is as of when it began: an event after that is newer
    try:
        orgs = [org for org in api.organizations() if _valid(context, ids.ORGANIZATION, org["organization_id"])]
        directories = [d for org in orgs for d in api.directories(org["organization_id"])
                       if _valid(context, ids.DIRECTORY, d["directory_id"])]
    except ScalekitError as exc:
        raise dg.Failure(description=str(exc)) from exc
    now = utcnow()
    with warehouse.write() as con:
        upsert_organizations(con, orgs, now)
        upsert_directories(con, directories, now, listed_at)
        # A directory switched off or on again: its users' changes are held, or released for the delivery sensor.
        holds = apply_directory_holds(con, None)
        org_preview = preview(con, "SELECT organization_id, display_name, external_id FROM organizations ORDER BY 1")
        dir_preview = preview(con, "SELECT directory_id, organization_id, provider, enabled, total_users FROM directories ORDER BY 2")
    OutboxIndex(settings().outbox_index_path).mark_ready(holds["released_orgs"], now)
    context.log.info(f"{len(orgs)} organizations, {len(directories)} directories")
    yield dg.MaterializeResult(asset_key="organizations", metadata={
        "dagster/row_count": len(orgs), "preview": org_preview,
    })
    yield dg.MaterializeResult(asset_key="directories", metadata={
        "dagster/row_count": len(directories),
        "enabled": sum(1 for d in directories if d["enabled"]),
        "preview": dir_preview,
    })


def _valid(context, kind: ids.IdKind, value) -> bool:
    """Whether Scalekit's id has its kind's shape; one that has not is left out, with a warning."""
    if kind.matches(value):
        return True
    context.log.warning(f"left out: {ids.shown(value)} is not a Scalekit {kind.name} id")
    return False


class DirectorySnapshotConfig(dg.Config):
    mode: str = "full"  # "full": re-read the directory from Scalekit; "events": apply the inbox's webhook events
    up_to_seq: int = 0  # events mode: apply this organization's inbox events up to this sequence number (0: all)
    # events mode: how far the sensor saw the events applied, for the record; the run starts from the warehouse's mark
    after_seq: int = 0
    workers: int = 8  # full mode: organizations listed at once


@dg.multi_asset(
    specs=[
        dg.AssetSpec("directory_users", group_name="directory", deps=["directories"], kinds={"scalekit", "duckdb"},
                     description="Directory users per organization, with SCIM detail; deleted users kept as tombstones (deleted_at)."),
        dg.AssetSpec("directory_groups", group_name="directory", deps=["directories"], kinds={"scalekit", "duckdb"},
                     description="Directory groups per organization; deleted groups kept as tombstones (deleted_at)."),
    ],
    partitions_def=organizations_partitions,
    backfill_policy=dg.BackfillPolicy.single_run(),
    # No ``pool``: the step takes the pool's slot for each write itself (PoolTurns), and none while it lists.
)
def directory_snapshot(
    context: dg.AssetExecutionContext,
    config: DirectorySnapshotConfig,
    scalekit: ScalekitResource,
    warehouse: dg.ResourceParam[Warehouse],
):
    orgs = list(context.partition_keys)
    metadata: dict = {"organizations": len(orgs), "mode": config.mode}
    if config.mode not in ("full", "events"):
        raise dg.Failure(description=f"unknown mode {config.mode!r}: expected 'full' or 'events'")
    turns = PoolTurns.of(context)
    to_sync = orgs
    if config.mode == "events":
        with turns.turn():
            applied, to_sync = apply_inbox_events(context, warehouse, orgs, config.up_to_seq)
        metadata.update(applied)
        if to_sync:
            context.log.info(f"{len(to_sync)} organization(s) have users of an unknown directory: syncing in full")
            metadata["organizations_resynced"] = len(to_sync)
    if to_sync:
        if nice := listing_nice(context.run):
            context.log.info(f"a reconciliation: listing at CPU niceness {nice}, behind the webhook path's runs")
        try:
            report = sync_organizations(scalekit.api(), warehouse, to_sync, settings().home / "spool",
                                        workers=config.workers, progress=context.log.info, turns=turns,
                                        listing_nice=nice)
        except ScalekitError as exc:
            raise dg.Failure(description=str(exc)) from exc
        for org in report.deleted:
            context.log.warning(f"{org} is deleted in Scalekit: its users and groups are tombstoned, and their "
                                "deprovisioning goes through the guard")
        for org, why in report.skipped.items():
            context.log.warning(why)
        for org, error in report.failed.items():
            context.log.error(f"{ids.shown(org)}: {error}")
        metadata.update({
            "users_new": report.total("users_new"), "users_changed": report.total("users_changed"),
            "users_deleted": report.total("users_deleted"), "groups_new": report.total("groups_new"),
            "groups_changed": report.total("groups_changed"), "groups_deleted": report.total("groups_deleted"),
            "organizations_synced": len(report.synced), "organizations_deleted": len(report.deleted),
            "organizations_skipped": len(report.skipped),
            "organizations_failed": len(report.failed),
            "failures": dg.MetadataValue.json(report.failed),
        })

    params = {"orgs": orgs}
    in_orgs = "list_contains($orgs, organization_id)"
    with turns.turn(), warehouse.read() as con:  # even a reader holds DuckDB's file lock: in turn, briefly
        users = count(con, f"SELECT 1 FROM directory_users WHERE {in_orgs} AND deleted_at IS NULL", params)
        groups = count(con, f"SELECT 1 FROM directory_groups WHERE {in_orgs} AND deleted_at IS NULL", params)
        user_preview = preview(con, f"""SELECT user_id, email, given_name, family_name, active, deleted_at
            FROM directory_users WHERE {in_orgs} ORDER BY coalesce(event_at, synced_at) DESC, user_id""", params)
        group_preview = preview(con, f"""SELECT group_id, display_name, deleted_at FROM directory_groups
            WHERE {in_orgs} ORDER BY display_name""", params)
    yield dg.MaterializeResult(asset_key="directory_users", metadata={
        **metadata, "dagster/row_count": users, "preview": user_preview,
    })
    yield dg.MaterializeResult(asset_key="directory_groups", metadata={
        "dagster/row_count": groups, "preview": group_preview,
    })


def apply_inbox_events(context, warehouse: Warehouse, orgs: list[str], up_to_seq: int) -> tuple[dict, list[str]]:
    """Apply every inbox event of these organizations up to ``up_to_seq`` (0: all) that the warehouse has not
    applied yet, in one transaction, and move their applied marks to it. Returns the outcomes (as metadata) and the
    organizations to read again in full: Scalekit's user events do not name the user's directory, and where the
    warehouse cannot tell it either, a full sync of the organization places the user.

    The warehouse's own mark says where to start, not the sensor: a run that failed moved nothing, so the next one
    applies its events too, and an event applied twice is recorded once and changes nothing."""
    for org in orgs:  # a partition added before ids were checked names nothing here
        try:
            ids.ORGANIZATION.check(org)
        except ids.InvalidId as exc:
            raise dg.Failure(description=f"partition {exc}") from exc
    inbox = Inbox(settings().inbox_location)
    end = up_to_seq or inbox.last_seq()
    with warehouse.write() as con:
        start = applied_marks(con, orgs)
        events = [event_from_inbox(item) for org in orgs for item in inbox.read_organization(org, start[org], end)]
        outcomes = apply_events(con, events, utcnow())
        marks = {org: max(start[org], end) for org in orgs}
        record_applied(con, marks, utcnow())
        unplaced = unplaced_organizations(con, orgs)
    publish_marks(context, inbox, marks)
    context.log.info(f"applied webhook events for {len(orgs)} organization(s) up to seq {end}: {outcomes}")
    return {f"events_{k}": v for k, v in outcomes.items()} | {"events": len(events)}, unplaced


def publish_marks(context, inbox: Inbox, marks: dict[str, int]) -> None:
    """Tell the webhook sensor (through the inbox) how far events are applied, once the warehouse has them.
    If this fails, the warehouse's marks still hold: the sensor asks again and that run finds nothing to apply."""
    try:
        inbox.mark_applied(marks)
    except Exception as exc:  # whichever store and failure: the marks are a copy, the warehouse's stand
        context.log.warning(f"could not record the applied marks in the inbox ({exc}); the sensor will ask again")
