"""Derived state over the warehouse: memberships, roles (the role mapping applied in SQL) and the users' type-2
history. Plain functions over a DuckDB connection; the caller owns the transaction (``Warehouse.write()``).
Each takes one organization or a list of them: a run over many small organizations costs a few statements, not a
few per organization.

Memberships and group-derived roles are kept for DEACTIVATED users. Deactivation is reversible in every directory
(Okta, Entra ID, Google suspend), the directory keeps the user's groups, and a SaaS application keeps the inactive
user (who cannot sign in) with their memberships, so a reactivation restores access exactly and without a burst of
changes. Only deletion (a tombstone) removes a user's memberships and roles. ``default_role`` is the exception: it
is given to active users only, so deactivating a user revokes it.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

import duckdb

from scim_pipeline.provisioning.role_mapping import RoleMapping
from scim_pipeline.warehouse.sql import first_int

if TYPE_CHECKING:
    import pandas as pd


Orgs = str | list[str]
IN_ORGS = "list_contains($orgs, {}.organization_id)"


def _orgs(orgs: Orgs) -> dict:
    return {"orgs": [orgs] if isinstance(orgs, str) else list(orgs)}


def derive_memberships(con: duckdb.DuckDBPyConnection, orgs: Orgs) -> int:
    """Replace the organizations' ``group_memberships`` with the raw memberships of live users in live groups
    (deactivated users included, see the module's notes). Returns the number of memberships."""
    con.execute(f"DELETE FROM group_memberships m WHERE {IN_ORGS.format('m')}", _orgs(orgs))
    return first_int(con.execute(
        f"""
        INSERT INTO group_memberships (organization_id, group_id, user_id, group_name)
        SELECT m.organization_id, m.group_id, m.user_id, g.display_name
        FROM directory_user_groups m
        JOIN directory_users u ON u.user_id = m.user_id AND u.organization_id = m.organization_id
                              AND u.deleted_at IS NULL
        JOIN directory_groups g ON g.group_id = m.group_id AND g.organization_id = m.organization_id
                               AND g.deleted_at IS NULL
        WHERE {IN_ORGS.format('m')}
        """,
        _orgs(orgs),
    ))


def like_pattern(wildcard: str) -> str:
    """The ILIKE pattern (escape character ``\\``) of a rule's ``*`` wildcard pattern."""
    escaped = wildcard.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%")


def _load_rules(con: duckdb.DuckDBPyConnection, mapping: RoleMapping) -> None:
    con.execute(
        """CREATE OR REPLACE TEMP TABLE _role_rules (
               priority INTEGER, source VARCHAR, role_name VARCHAR, organization_id VARCHAR,
               name_pattern VARCHAR, id_pattern VARCHAR)"""
    )
    rows = [
        (
            rule.index, rule.source, rule.role, rule.organization_id,
            like_pattern(rule.group) if rule.group is not None else None,
            like_pattern(rule.group_id) if rule.group_id is not None else None,
        )
        for rule in mapping.rules
    ]
    if rows:
        con.executemany("INSERT INTO _role_rules VALUES (?, ?, ?, ?, ?, ?)", rows)


def derive_roles(con: duckdb.DuckDBPyConnection, orgs: Orgs, mapping: RoleMapping) -> int:
    """Replace the organizations' ``role_assignments`` (live users only) from ``group_memberships``, the mapping's
    rules and, unless switched off, the directories' own group-to-role assignments; ``default_role`` for active users
    with no other role. One row per (user, role); ``source`` is the first grant: ``rule:<n>:<pattern>`` in file
    order, then ``directory:<group_id>``, else ``default``. Returns the number of assignments."""
    _load_rules(con, mapping)
    con.execute(f"DELETE FROM role_assignments r WHERE {IN_ORGS.format('r')}", _orgs(orgs))
    return first_int(con.execute(
        rf"""
        INSERT INTO role_assignments (organization_id, user_id, role_name, source)
        WITH group_roles AS (
            SELECT g.organization_id, g.group_id, r.role_name, r.source, r.priority
            FROM directory_groups g
            JOIN _role_rules r
              ON (r.organization_id IS NULL OR r.organization_id = g.organization_id)
             AND (g.display_name ILIKE r.name_pattern ESCAPE '\' OR g.group_id ILIKE r.id_pattern ESCAPE '\')
            WHERE {IN_ORGS.format('g')} AND g.deleted_at IS NULL
            UNION ALL
            SELECT organization_id, a.group_id, a.role_name, 'directory:' || a.group_id, 1000000000
            FROM (
                SELECT d.organization_id,
                       unnest(from_json(role_assignments, '[{{"group_id": "VARCHAR", "role_name": "VARCHAR"}}]')) AS a
                FROM directories d
                WHERE {IN_ORGS.format('d')} AND $use_directory
            )
            WHERE coalesce(a.role_name, '') <> '' AND a.group_id IS NOT NULL
        ),
        granted AS (
            SELECT m.organization_id, m.user_id, gr.role_name, arg_min(gr.source, (gr.priority, gr.source)) AS source
            FROM group_memberships m
            JOIN group_roles gr ON gr.group_id = m.group_id AND gr.organization_id = m.organization_id
            WHERE {IN_ORGS.format('m')}
            GROUP BY m.organization_id, m.user_id, gr.role_name
        )
        SELECT organization_id, user_id, role_name, source FROM granted
        UNION ALL
        SELECT u.organization_id, u.user_id, $default_role, 'default'
        FROM directory_users u
        WHERE $default_role IS NOT NULL
          AND {IN_ORGS.format('u')} AND u.deleted_at IS NULL AND coalesce(u.active, true)
          AND NOT EXISTS (SELECT 1 FROM granted g WHERE g.user_id = u.user_id AND g.organization_id = u.organization_id)
        """,
        {**_orgs(orgs), "use_directory": mapping.use_directory_role_assignments,
         "default_role": mapping.default_role},
    ))


def desired_state(con: duckdb.DuckDBPyConnection, org_id: str) -> dict[str, pd.DataFrame]:
    """The organization's desired application state (the ``desired_*`` views) as DataFrames: users, memberships,
    roles. For inspection and tests; the diff reads the views directly."""
    return {
        name: con.execute(f"SELECT * EXCLUDE (organization_id) FROM desired_{name} WHERE organization_id = $org "
                          f"ORDER BY ALL", {"org": org_id}).df()
        for name in ("users", "memberships", "roles")
    }


def update_user_history(con: duckdb.DuckDBPyConnection, orgs: Orgs, now: datetime) -> dict[str, int]:
    """Type-2 history of the organizations' users in ``directory_users_history``: an interval is closed
    (``valid_to = now``) and a new one opened whenever a user's attributes, ``active``, deleted state or roles
    change (compared by ``row_hash`` over the canonical fields, roles sorted). Returns ``{"closed", "opened"}``."""
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE _history_now AS
        SELECT *, md5(to_json(struct_pack(email, given_name, family_name, preferred_username, active, deleted,
                                          roles))::VARCHAR) AS row_hash
        FROM (
            SELECT u.user_id, u.organization_id, u.email, u.given_name, u.family_name, u.preferred_username,
                   coalesce(u.active, true) AS active, u.deleted_at IS NOT NULL AS deleted,
                   coalesce(r.roles, []::VARCHAR[]) AS roles
            FROM directory_users u
            LEFT JOIN (
                SELECT organization_id, user_id, list_sort(list(DISTINCT role_name)) AS roles
                FROM role_assignments a WHERE {IN_ORGS.format('a')} GROUP BY organization_id, user_id
            ) r ON r.user_id = u.user_id AND r.organization_id = u.organization_id
            WHERE {IN_ORGS.format('u')}
        )
        """,
        _orgs(orgs),
    )
    closed = first_int(con.execute(
        f"""
        UPDATE directory_users_history h SET valid_to = $now
        WHERE {IN_ORGS.format('h')} AND h.valid_to IS NULL
          AND NOT EXISTS (SELECT 1 FROM _history_now n WHERE n.user_id = h.user_id
                          AND n.organization_id = h.organization_id AND n.row_hash = h.row_hash)
        """,
        {**_orgs(orgs), "now": now},
    ))
    opened = first_int(con.execute(
        """
        INSERT INTO directory_users_history (user_id, organization_id, valid_from, valid_to, email, given_name,
                                             family_name, preferred_username, active, deleted, roles, row_hash)
        SELECT user_id, organization_id, $now, NULL, email, given_name, family_name, preferred_username, active,
               deleted, roles, row_hash
        FROM _history_now n
        WHERE NOT EXISTS (SELECT 1 FROM directory_users_history h
                          WHERE h.organization_id = n.organization_id AND h.user_id = n.user_id
                            AND h.valid_to IS NULL)
        """,
        {"now": now},
    ))
    return {"closed": closed, "opened": opened}
