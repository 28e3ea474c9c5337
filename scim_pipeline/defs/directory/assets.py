"""Directory assets: what Scalekit says, in DuckDB.

``organizations`` and ``directories`` are the catalogue (one listing, unpartitioned). ``directory_users`` and
``directory_groups`` are one organization per partition, written together so that no organization is ever
half-written; a run that covers many organizations (a backfill, the reconciliation) is a single run that lists them
concurrently. The same step also runs in ``events`` mode, where it applies the webhook events waiting in the inbox
instead of re-reading the directory: both modes end in the same derived assets.
"""


import dagster as dg

from scim_pipeline.config import settings
from scim_pipeline.defs.metadata import count, preview
from scim_pipeline.defs.partitions import WAREHOUSE_POOL, organizations_partitions
from scim_pipeline.scalekit.directory_api import ScalekitError
from scim_pipeline.lib.clock import utcnow
from scim_pipeline.warehouse.directory_sync import sync_organizations
from scim_pipeline.provisioning.change_sets import apply_directory_holds
from scim_pipeline.provisioning.outbox_index import OutboxIndex
from scim_pipeline.receiver.inbox import Inbox
from scim_pipeline.defs.resources import ScalekitResource
from scim_pipeline.warehouse.connection import Warehouse
from scim_pipeline.warehouse.directory import upsert_directories, upsert_organizations
from scim_pipeline.warehouse.events import apply_events, event_from_body, parse_time


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
    try:
        orgs = list(api.organizations())
        directories = [d for org in orgs for d in api.directories(org["organization_id"])]
    except ScalekitError as exc:
        raise dg.Failure(description=str(exc)) from exc
    now = utcnow()
    with warehouse.write() as con:
        upsert_organizations(con, orgs, now)
        upsert_directories(con, directories, now)
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


class DirectorySnapshotConfig(dg.Config):
    mode: str = "full"  # "full": re-read the directory from Scalekit; "events": apply the inbox's webhook events
    up_to_seq: int = 0  # events mode: apply this organization's inbox events up to this sequence number (0: all)
    after_seq: int = 0  # events mode: start reading the inbox after this sequence number
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
    pool=WAREHOUSE_POOL,
)
def directory_snapshot(
    context: dg.AssetExecutionContext,
    config: DirectorySnapshotConfig,
    scalekit: ScalekitResource,
    warehouse: dg.ResourceParam[Warehouse],
):
    orgs = list(context.partition_keys)
    metadata: dict = {"organizations": len(orgs), "mode": config.mode}
    if config.mode == "events":
        metadata.update(apply_inbox_events(context, warehouse, orgs, config.after_seq, config.up_to_seq))
    elif config.mode == "full":
        try:
            report = sync_organizations(
                scalekit.api(), warehouse, orgs, settings().home / "spool", workers=config.workers, progress=context.log.info,
            )
        except ScalekitError as exc:
            raise dg.Failure(description=str(exc)) from exc
        for org, why in report.skipped.items():
            context.log.warning(why)
        for org, error in report.failed.items():
            context.log.error(f"{org}: {error}")
        metadata.update({
            "users_new": report.total("users_new"), "users_changed": report.total("users_changed"),
            "users_deleted": report.total("users_deleted"), "groups_new": report.total("groups_new"),
            "groups_changed": report.total("groups_changed"), "groups_deleted": report.total("groups_deleted"),
            "organizations_synced": len(report.synced), "organizations_skipped": len(report.skipped),
            "organizations_failed": len(report.failed),
            "failures": dg.MetadataValue.json(report.failed),
        })
    else:
        raise dg.Failure(description=f"unknown mode {config.mode!r}: expected 'full' or 'events'")

    params = {"orgs": orgs}
    in_orgs = "list_contains($orgs, organization_id)"
    with warehouse.read() as con:
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


def apply_inbox_events(context, warehouse, orgs: list[str], after_seq: int, up_to_seq: int) -> dict:
    """Apply the inbox's events for these organizations in (after_seq, up_to_seq] in one transaction."""
    inbox = Inbox(settings().inbox_path)
    wanted = set(orgs)
    events, seq = [], after_seq
    while True:
        page = inbox.read_after(seq, limit=1000)
        if not page:
            break
        for item in page:
            if up_to_seq and item.seq > up_to_seq:
                break
            if item.organization_id in wanted:
                try:
                    events.append(event_from_body(item.webhook_id, item.body, item.seq, parse_time(item.received_at)))
                except ValueError as exc:  # undecodable body: recorded as invalid, never blocks the others
                    context.log.warning(f"inbox event {item.seq} is malformed: {exc}")
        seq = page[-1].seq
        if up_to_seq and seq >= up_to_seq:
            break
    with warehouse.write() as con:
        outcomes = apply_events(con, events, utcnow())
    context.log.info(f"applied webhook events for {len(orgs)} organization(s): {outcomes}")
    return {f"events_{k}": v for k, v in outcomes.items()} | {"events": len(events)}
