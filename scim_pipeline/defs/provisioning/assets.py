"""Provisioning assets: from the synced directory to what the application must have, and the changes to get it
there. One organization per partition; every step is SQL over whole tables (scim_pipeline.provisioning.change_sets).

The four assets are computed by one step in one transaction: memberships, roles, history and change sets of an
organization always agree with each other, and a run costs one step's bookkeeping instead of four (the webhook
path counts its seconds).
"""

from datetime import timedelta

import dagster as dg

from scim_pipeline.config import settings
from scim_pipeline.defs.metadata import count, preview
from scim_pipeline.defs.partitions import WAREHOUSE_POOL, organizations_partitions
from scim_pipeline.lib.clock import utcnow
from scim_pipeline.provisioning.change_sets import compute_change_sets
from scim_pipeline.provisioning.derive import derive_memberships, derive_roles, update_user_history
from scim_pipeline.provisioning.outbox_index import OutboxIndex
from scim_pipeline.provisioning.role_mapping import RoleMapping, RoleMappingError, load_role_mapping
from scim_pipeline.warehouse.connection import Warehouse

IN_ORGS = "list_contains($orgs, organization_id)"
INLINE_DELIVERY_GRACE = timedelta(seconds=60)


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
    pool=WAREHOUSE_POOL,
    can_subset=True,
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
    metadata: dict[str, dict] = {}
    with warehouse.write() as con:
        # In dependency order: each reads what the one before it wrote, or the table as it is when not selected.
        if "group_memberships" in selected:
            metadata["group_memberships"] = _memberships(con, orgs)
        if "role_assignments" in selected:
            metadata["role_assignments"] = _roles(con, orgs, mapping)
        if "directory_users_history" in selected:
            metadata["directory_users_history"] = _history(con, orgs, now)
        if "change_sets" in selected:
            metadata["change_sets"], ready = _change_sets(con, orgs, now, mapping, _reads_the_directory(context))

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


def _memberships(con, orgs: list[str]) -> dict:
    rows = derive_memberships(con, orgs)
    return {"dagster/row_count": rows, "preview": preview(
        con, f"SELECT group_name, user_id FROM group_memberships WHERE {IN_ORGS} ORDER BY 1, 2", {"orgs": orgs})}


def _roles(con, orgs: list[str], mapping: RoleMapping) -> dict:
    params = {"orgs": orgs}
    rows = derive_roles(con, orgs, mapping)
    per_role = dict(con.execute(f"""SELECT role_name, count(DISTINCT user_id) FROM role_assignments
        WHERE {IN_ORGS} GROUP BY 1 ORDER BY 1""", params).fetchall())
    return {
        "dagster/row_count": rows, "users_per_role": dg.MetadataValue.json(per_role), "role_mappings": mapping.path,
        "preview": preview(con, f"""SELECT user_id, role_name, source FROM role_assignments WHERE {IN_ORGS}
            ORDER BY 1, 2""", params),
    }


def _history(con, orgs: list[str], now) -> dict:
    history = update_user_history(con, orgs, now)
    opened, closed = history["opened"], history["closed"]
    rows = count(con, f"SELECT 1 FROM directory_users_history WHERE {IN_ORGS}", {"orgs": orgs})
    return {"dagster/row_count": rows, "intervals_opened": opened, "intervals_closed": closed}


def _reads_the_directory(context: dg.AssetExecutionContext) -> bool:
    """Whether this run re-reads its organizations from Scalekit (a full sync, the reconciliation): then the dead
    changes still wanted get a fresh round of attempts."""
    if dg.AssetKey("directory_users") not in context.job_def.asset_layer.selected_asset_keys:
        return False
    ops = (context.run.run_config or {}).get("ops") or {}
    return ((ops.get("directory_snapshot") or {}).get("config") or {}).get("mode", "full") == "full"


def _change_sets(con, orgs: list[str], now, mapping: RoleMapping, full: bool) -> tuple[dict, list[str]]:
    """The change sets' metadata, and the organizations with changes ready to send."""
    params = {"orgs": orgs}
    diff = compute_change_sets(con, orgs, now, mapping, full=full)  # one pass over every organization of the run
    tripped = diff.pop("guard_tripped")
    status = dict(con.execute(
        f"SELECT status, count(*) FROM change_sets WHERE {IN_ORGS} GROUP BY 1", params).fetchall())
    ready = [r[0] for r in con.execute(f"""SELECT DISTINCT organization_id FROM change_sets
        WHERE {IN_ORGS} AND status IN ('pending', 'failed')""", params).fetchall()]
    metadata = {
        "dagster/row_count": sum(status.values()),
        **{f"diff/{k}": v for k, v in sorted(diff.items())},
        **{f"status/{k}": v for k, v in sorted(status.items())},
        "guard_tripped": dg.MetadataValue.json(tripped),
        "preview": preview(con, f"""SELECT organization_id, entity, op, entity_key, status, hold_reason, attempts,
            last_error FROM change_sets WHERE {IN_ORGS} AND status NOT IN ('delivered', 'superseded')
            ORDER BY created_at DESC""", params),
    }
    return metadata, ready
