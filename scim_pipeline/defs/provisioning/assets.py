"""Provisioning assets: from the synced directory to what the application must have, and the changes to get it
there. One organization per partition; every step is SQL over whole tables (scim_pipeline.warehouse.provisioning)."""


import dagster as dg

from scim_pipeline.config import settings
from scim_pipeline.defs.metadata import count, preview
from scim_pipeline.defs.partitions import WAREHOUSE_POOL, organizations_partitions
from scim_pipeline.directory_sync import utcnow
from scim_pipeline.outbox_index import OutboxIndex
from scim_pipeline.resources.warehouse import WarehouseResource
from scim_pipeline.role_mapping import RoleMappingError, load_role_mapping
from scim_pipeline.warehouse.provisioning import (
    compute_change_sets,
    derive_memberships,
    derive_roles,
    update_user_history,
)

PARTITIONED = dict(
    partitions_def=organizations_partitions,
    backfill_policy=dg.BackfillPolicy.single_run(),
    pool=WAREHOUSE_POOL,
    group_name="provisioning",
)
IN_ORGS = "list_contains($orgs, organization_id)"


@dg.asset(deps=["directory_users", "directory_groups"], **PARTITIONED,
          description="Who is in which group: live users in live groups.")
def group_memberships(context: dg.AssetExecutionContext, warehouse: WarehouseResource) -> dg.MaterializeResult:
    orgs = list(context.partition_keys)
    with warehouse.warehouse().write() as con:
        rows = sum(derive_memberships(con, org) for org in orgs)
        sample = preview(con, f"SELECT group_name, user_id FROM group_memberships WHERE {IN_ORGS} ORDER BY 1, 2",
                         {"orgs": orgs})
    return dg.MaterializeResult(metadata={"dagster/row_count": rows, "preview": sample})


@dg.asset(deps=["group_memberships", "directories"], **PARTITIONED,
          description="Application roles per user, from role_mappings.yaml and the directory's own group-to-role "
          "assignments; `source` names the rule or group that granted each.")
def role_assignments(context: dg.AssetExecutionContext, warehouse: WarehouseResource) -> dg.MaterializeResult:
    orgs = list(context.partition_keys)
    path = settings().role_mappings_path()
    try:
        mapping = load_role_mapping(path)
    except RoleMappingError as exc:
        raise dg.Failure(description=f"role mapping: {exc}") from exc
    with warehouse.warehouse().write() as con:
        rows = sum(derive_roles(con, org, mapping) for org in orgs)
        per_role = dict(con.execute(
            f"SELECT role_name, count(DISTINCT user_id) FROM role_assignments WHERE {IN_ORGS} GROUP BY 1 ORDER BY 1",
            {"orgs": orgs}).fetchall())
        sample = preview(con, f"SELECT user_id, role_name, source FROM role_assignments WHERE {IN_ORGS} ORDER BY 1, 2",
                         {"orgs": orgs})
    return dg.MaterializeResult(metadata={
        "dagster/row_count": rows, "users_per_role": dg.MetadataValue.json(per_role),
        "role_mappings": str(path), "preview": sample,
    })


@dg.asset(deps=["role_assignments"], **PARTITIONED,
          description="Type-2 history of every directory user: a new interval whenever attributes, active, "
          "deletion or roles change.")
def directory_users_history(context: dg.AssetExecutionContext, warehouse: WarehouseResource) -> dg.MaterializeResult:
    orgs = list(context.partition_keys)
    now = utcnow()
    opened = closed = 0
    with warehouse.warehouse().write() as con:
        for org in orgs:
            result = update_user_history(con, org, now)
            opened += result["opened"]
            closed += result["closed"]
        rows = count(con, f"SELECT 1 FROM directory_users_history WHERE {IN_ORGS}", {"orgs": orgs})
    return dg.MaterializeResult(metadata={"dagster/row_count": rows, "intervals_opened": opened,
                                          "intervals_closed": closed})


@dg.asset(deps=["role_assignments", "group_memberships", "directory_users"], **PARTITIONED,
          description="The change ledger (an outbox): what the application must receive to match the directory. "
          "The delivery sensor sends what is pending; the mass-deprovisioning guard holds what needs approval.")
def change_sets(context: dg.AssetExecutionContext, warehouse: WarehouseResource) -> dg.MaterializeResult:
    orgs = list(context.partition_keys)
    mapping = load_role_mapping(settings().role_mappings_path())
    now = utcnow()
    with warehouse.warehouse().write() as con:
        totals = compute_change_sets(con, orgs, now, mapping)  # one pass over every organization of the run
        tripped = totals.pop("guard_tripped")
        status = dict(con.execute(
            f"SELECT status, count(*) FROM change_sets WHERE {IN_ORGS} GROUP BY 1", {"orgs": orgs}).fetchall())
        ready = [r[0] for r in con.execute(
            f"SELECT DISTINCT organization_id FROM change_sets WHERE {IN_ORGS} AND status IN ('pending', 'failed')",
            {"orgs": orgs}).fetchall()]
        sample = preview(con, f"""SELECT organization_id, entity, op, entity_key, status, attempts, last_error
            FROM change_sets WHERE {IN_ORGS} AND status <> 'delivered' AND status <> 'superseded'
            ORDER BY created_at DESC""", {"orgs": orgs})
    OutboxIndex(settings().outbox_index_path).mark_ready(ready, now)
    if tripped:
        context.log.warning(
            "mass-deprovisioning guard holds changes of " + ", ".join(tripped)
            + ": review with `scim-pipeline changes --status held`, release with `scim-pipeline approve --org ORG`"
        )
    return dg.MaterializeResult(metadata={
        "dagster/row_count": sum(status.values()),
        **{f"diff/{k}": v for k, v in sorted(totals.items())},
        **{f"status/{k}": v for k, v in sorted(status.items())},
        "guard_tripped": dg.MetadataValue.json(tripped),
        "preview": sample,
    })
