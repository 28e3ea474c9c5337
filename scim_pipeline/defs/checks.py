"""Data checks, run after each materialization: they read the warehouse and say what is wrong, with examples."""


import dagster as dg

from scim_pipeline.warehouse.connection import Warehouse

EMAIL_PATTERN = r"^[^@\s]+@[^@\s]+\.[^@\s]+$"
COUNT_TOLERANCE = 0.02  # the directory's own totals may lag a little behind its listing


def _result(con, query: str, what: str, severity=dg.AssetCheckSeverity.ERROR) -> dg.AssetCheckResult:
    rows = con.execute(query).fetchall()
    return dg.AssetCheckResult(
        passed=not rows,
        severity=severity,
        description=f"{len(rows)} {what}" if rows else f"no {what}",
        metadata={"failing": len(rows), "examples": dg.MetadataValue.json([list(map(str, r)) for r in rows[:10]])},
    )


@dg.asset_check(asset="directory_users", description="Every user id appears once.")
def users_unique_ids(warehouse: dg.ResourceParam[Warehouse]) -> dg.AssetCheckResult:
    with warehouse.read() as con:
        return _result(con, "SELECT user_id, count(*) FROM directory_users GROUP BY 1 HAVING count(*) > 1",
                       "duplicated user ids")


@dg.asset_check(asset="directory_users", description="Live users have a well-formed email.")
def users_emails_well_formed(warehouse: dg.ResourceParam[Warehouse]) -> dg.AssetCheckResult:
    with warehouse.read() as con:
        return _result(con, f"""SELECT user_id, email FROM directory_users
            WHERE deleted_at IS NULL AND NOT regexp_matches(coalesce(email, ''), '{EMAIL_PATTERN}')""",
                       "users with a malformed email", dg.AssetCheckSeverity.WARN)


@dg.asset_check(asset="directory_users", description="Live users and groups per directory match the directory's "
                f"own totals (total_users, total_groups) within {COUNT_TOLERANCE:.0%}.")
def users_match_directory_totals(warehouse: dg.ResourceParam[Warehouse]) -> dg.AssetCheckResult:
    with warehouse.read() as con:
        return _result(con, f"""
            SELECT d.directory_id, d.total_users, coalesce(u.n, 0) AS users, d.total_groups, coalesce(g.n, 0) AS groups
            FROM directories d
            LEFT JOIN (SELECT directory_id, count(*) n FROM directory_users WHERE deleted_at IS NULL GROUP BY 1) u
                USING (directory_id)
            LEFT JOIN (SELECT directory_id, count(*) n FROM directory_groups WHERE deleted_at IS NULL GROUP BY 1) g
                USING (directory_id)
            WHERE d.enabled AND d.directory_id IN (SELECT directory_id FROM directory_users)
              AND (abs(coalesce(u.n, 0) - d.total_users) > greatest(1, d.total_users * {COUNT_TOLERANCE})
                   OR abs(coalesce(g.n, 0) - d.total_groups) > greatest(1, d.total_groups * {COUNT_TOLERANCE}))
            """, "directories whose counts differ from their totals", dg.AssetCheckSeverity.WARN)


@dg.asset_check(asset="directory_groups", description="Every group id appears once.")
def groups_unique_ids(warehouse: dg.ResourceParam[Warehouse]) -> dg.AssetCheckResult:
    with warehouse.read() as con:
        return _result(con, "SELECT group_id, count(*) FROM directory_groups GROUP BY 1 HAVING count(*) > 1",
                       "duplicated group ids")


@dg.asset_check(asset="group_memberships", description="Every membership points at a live user and a live group.")
def memberships_point_at_live_rows(warehouse: dg.ResourceParam[Warehouse]) -> dg.AssetCheckResult:
    with warehouse.read() as con:
        return _result(con, """
            SELECT m.organization_id, m.group_id, m.user_id FROM group_memberships m
            LEFT JOIN directory_users u ON u.user_id = m.user_id AND u.deleted_at IS NULL
            LEFT JOIN directory_groups g ON g.group_id = m.group_id AND g.deleted_at IS NULL
            WHERE u.user_id IS NULL OR g.group_id IS NULL""", "memberships of a deleted or unknown user or group")


@dg.asset_check(asset="change_sets", description="Held changes and why: the mass-deprovisioning guard's wait for "
                "`scim-pipeline approve --org ORG`, or a disabled directory's (released when it is enabled again).")
def held_changes(warehouse: dg.ResourceParam[Warehouse]) -> dg.AssetCheckResult:
    with warehouse.read() as con:
        return _result(con, """SELECT organization_id, hold_reason, count(*) AS changes, min(created_at) AS since
            FROM change_sets WHERE status = 'held' GROUP BY ALL ORDER BY ALL""",
                       "organizations and reasons with held changes", dg.AssetCheckSeverity.WARN)


@dg.asset_check(asset="change_sets", description="Dead letters: changes that failed every attempt of their round, "
                "with why and since when (`scim-pipeline changes --status dead`). They are tried again after the next "
                "successful delivery to their organization, at the next full sync, or with `scim-pipeline retry`.")
def dead_changes(warehouse: dg.ResourceParam[Warehouse]) -> dg.AssetCheckResult:
    with warehouse.read() as con:
        return _result(con, """SELECT change_id, organization_id, entity, op, entity_key, last_error, attempts,
                   coalesce(dead_at, created_at) AS dead_since
            FROM change_sets WHERE status = 'dead' ORDER BY dead_since, change_id""", "dead changes")


CHECKS = [users_unique_ids, users_emails_well_formed, users_match_directory_totals, groups_unique_ids,
          memberships_point_at_live_rows, held_changes, dead_changes]
