"""Provisioning assets: from the synced directory to what the application must have, and the changes to get it
there. One organization per partition; every step is SQL over whole tables (scim_pipeline.provisioning.change_sets).

The four assets are computed by one step, each organization's in one transaction: memberships, roles, history and
change sets of an organization always agree with each other, and a run costs one step's bookkeeping instead of four
(the webhook path counts its seconds). Organizations go in chunks of about ``CHUNK_USERS`` users, one transaction
each (many small organizations share one; a large one is a chunk alone), and the step takes the ``warehouse``
pool's slot per turn of chunks (``PoolTurns``): a webhook run waits for one chunk, not a whole reconciliation's.
"""

from datetime import timedelta

import dagster as dg

from scim_pipeline.config import settings
from scim_pipeline.defs.metadata import count, preview
from scim_pipeline.defs.partitions import organizations_partitions
from scim_pipeline.defs.warehouse_pool import PoolTurns
from scim_pipeline.lib.clock import utcnow
from scim_pipeline.provisioning.change_sets import compute_change_sets
from scim_pipeline.provisioning.derive import derive_memberships, derive_roles, update_user_history
from scim_pipeline.provisioning.outbox_index import OutboxIndex
from scim_pipeline.provisioning.role_mapping import RoleMapping, RoleMappingError, load_role_mapping
from scim_pipeline.warehouse.connection import Warehouse, transaction

IN_ORGS = "list_contains($orgs, organization_id)"
INLINE_DELIVERY_GRACE = timedelta(seconds=60)
CHUNK_USERS = 5_000  # a few large organizations, or hundreds of small ones, a transaction


@dg.multi_asset(
    specs=[
        dg.AssetSpec("group_memberships", group_name="provisioning", kinds={"duckdb"},
                     deps=["directory_users", "directory_groups"],
                     description="Who is in which group: live users in live groups."),
        dg.AssetSpec("role_assignments", group_name="provisioning", kinds={"duckdb"},
                     deps=["group_memberships", "directories"],
                     description="Application roles per user, from role_mappings.yaml and the directory's own "
                     "group-to-role assignments; `source` names the rule or group that granted each."),
        dg.AssetSpec("directory_users_history", group_name="provisioning", kinds={"duckdb"},
                     deps=["role_assignments"],
                     description="Type-2 history of every directory user: a new interval whenever attributes, "
                     "active, deletion or roles change."),
        dg.AssetSpec("change_sets", group_name="provisioning", kinds={"duckdb"},
                     deps=["role_assignments", "group_memberships", "directory_users"],
                     description="The change ledger (an outbox): what the application must receive to match the "
                     "directory. The delivery sensor sends what is pending; the mass-deprovisioning guard holds "
                     "what needs approval."),
    ],
    partitions_def=organizations_partitions,
    backfill_policy=dg.BackfillPolicy.single_run(),
    can_subset=True,
    # No ``pool``: the step takes the pool's slot for each turn of chunks itself (PoolTurns).
)
def provisioning(context: dg.AssetExecutionContext, warehouse: dg.ResourceParam[Warehouse]):
    orgs = list(context.partition_keys)
    selected = {key.to_user_string() for key in context.selected_asset_keys}
    now = utcnow()
    mapping = None
    if selected & {"role_assignments", "change_sets"}:  # the rules, and the guard's settings
        try:
            mapping = load_role_mapping(settings().role_mappings_path())
        except RoleMappingError as exc:
            raise dg.Failure(description=f"role mapping: {exc}") from exc
    turns = PoolTurns.of(context)
    totals: dict = {"memberships": 0, "roles": 0, "opened": 0, "closed": 0, "diff": {}, "tripped": []}
    full = "change_sets" in selected and _reads_the_directory(context)
    chunks = [orgs] if len(orgs) == 1 else None  # the webhook path: one organization, one transaction
    metadata: dict[str, dict] | None = None
    while metadata is None:
        with turns.turn(), warehouse.session() as con:
            if chunks is None:
                chunks = _chunks(con, orgs)
            while chunks:
                with transaction(con):
                    _derive(con, chunks.pop(0), selected, now, mapping, full, totals)
                if chunks and turns.others_waiting():
                    break  # let the writer waiting go first; the next turn goes on with the next chunk
            else:
                metadata = _describe(con, orgs, selected, mapping, totals)
    ready = metadata.pop("ready", [])

    if "change_sets" in selected:
        # When this run delivers them itself (the webhook path), the mark is only a safety net for what it cannot
        # send.
        delivers_inline = dg.AssetKey("delivered_state") in (context.run.asset_selection or set())
        OutboxIndex(settings().outbox_index_path).mark_ready(
            ready, now + INLINE_DELIVERY_GRACE if delivers_inline else now)
        tripped = metadata["change_sets"]["guard_tripped"].value
        if tripped:
            context.log.warning(
                "mass-deprovisioning guard holds changes of " + ", ".join(tripped)
                + ": review with `scim-pipeline changes --status held`, release with `scim-pipeline approve --org ORG`"
            )
    for key, values in metadata.items():
        yield dg.MaterializeResult(asset_key=key, metadata=values)


def _chunks(con, orgs: list[str]) -> list[list[str]]:
    """The organizations in runs of about CHUNK_USERS users (users and tombstones: what the SQL reads)."""
    sizes = dict(con.execute(f"SELECT organization_id, count(*) FROM directory_users WHERE {IN_ORGS} GROUP BY 1",
                             {"orgs": orgs}).fetchall())
    chunks, chunk, users = [], [], 0
    for org in orgs:
        if chunk and users + sizes.get(org, 0) > CHUNK_USERS:
            chunks.append(chunk)
            chunk, users = [], 0
        chunk.append(org)
        users += sizes.get(org, 0)
    return chunks + [chunk] if chunk else chunks


def _derive(con, orgs: list[str], selected: set[str], now, mapping: RoleMapping | None, full: bool,
            totals: dict) -> None:
    """One chunk of organizations, in dependency order: each asset reads what the one before it wrote, or the table
    as it is when not selected."""
    if "group_memberships" in selected:
        totals["memberships"] += derive_memberships(con, orgs)
    if "role_assignments" in selected:
        totals["roles"] += derive_roles(con, orgs, mapping)
    if "directory_users_history" in selected:
        history = update_user_history(con, orgs, now)
        totals["opened"] += history["opened"]
        totals["closed"] += history["closed"]
    if "change_sets" in selected:
        diff = compute_change_sets(con, orgs, now, mapping, full=full)  # one pass over the chunk
        totals["tripped"] += diff.pop("guard_tripped")
        for key, value in diff.items():
            totals["diff"][key] = totals["diff"].get(key, 0) + value


def _describe(con, orgs: list[str], selected: set[str], mapping: RoleMapping | None, totals: dict) -> dict:
    """Each selected asset's metadata, in dependency order; ``ready``: the organizations with changes to send."""
    metadata: dict = {}
    if "group_memberships" in selected:
        metadata["group_memberships"] = _memberships(con, orgs, totals)
    if "role_assignments" in selected:
        metadata["role_assignments"] = _roles(con, orgs, mapping, totals)
    if "directory_users_history" in selected:
        metadata["directory_users_history"] = _history(con, orgs, totals)
    if "change_sets" in selected:
        metadata["change_sets"], metadata["ready"] = _change_sets(con, orgs, totals)
    return metadata


def _memberships(con, orgs: list[str], totals: dict) -> dict:
    return {"dagster/row_count": totals["memberships"], "preview": preview(
        con, f"SELECT group_name, user_id FROM group_memberships WHERE {IN_ORGS} ORDER BY 1, 2", {"orgs": orgs})}


def _roles(con, orgs: list[str], mapping: RoleMapping, totals: dict) -> dict:
    params = {"orgs": orgs}
    per_role = dict(con.execute(f"""SELECT role_name, count(DISTINCT user_id) FROM role_assignments
        WHERE {IN_ORGS} GROUP BY 1 ORDER BY 1""", params).fetchall())
    return {
        "dagster/row_count": totals["roles"], "users_per_role": dg.MetadataValue.json(per_role),
        "role_mappings": mapping.path,
        "preview": preview(con, f"""SELECT user_id, role_name, source FROM role_assignments WHERE {IN_ORGS}
            ORDER BY 1, 2""", params),
    }


def _history(con, orgs: list[str], totals: dict) -> dict:
    rows = count(con, f"SELECT 1 FROM directory_users_history WHERE {IN_ORGS}", {"orgs": orgs})
    return {"dagster/row_count": rows, "intervals_opened": totals["opened"], "intervals_closed": totals["closed"]}


def _reads_the_directory(context: dg.AssetExecutionContext) -> bool:
    """Whether this run re-reads its organizations from Scalekit (a full sync, the reconciliation): then the dead
    changes still wanted get a fresh round of attempts."""
    if dg.AssetKey("directory_users") not in context.job_def.asset_layer.selected_asset_keys:
        return False
    ops = (context.run.run_config or {}).get("ops") or {}
    return ((ops.get("directory_snapshot") or {}).get("config") or {}).get("mode", "full") == "full"


def _change_sets(con, orgs: list[str], totals: dict) -> tuple[dict, list[str]]:
    """The change sets' metadata, and the organizations with changes ready to send."""
    params = {"orgs": orgs}
    status = dict(con.execute(
        f"SELECT status, count(*) FROM change_sets WHERE {IN_ORGS} GROUP BY 1", params).fetchall())
    ready = [r[0] for r in con.execute(f"""SELECT DISTINCT organization_id FROM change_sets
        WHERE {IN_ORGS} AND status IN ('pending', 'failed')""", params).fetchall()]
    metadata = {
        "dagster/row_count": sum(status.values()),
        **{f"diff/{k}": v for k, v in sorted(totals["diff"].items())},
        **{f"status/{k}": v for k, v in sorted(status.items())},
        "guard_tripped": dg.MetadataValue.json(sorted(totals["tripped"])),
        "preview": preview(con, f"""SELECT organization_id, entity, op, entity_key, status, hold_reason, attempts,
            last_error FROM change_sets WHERE {IN_ORGS} AND status NOT IN ('delivered', 'superseded')
            ORDER BY created_at DESC""", params),
    }
    return metadata, ready
