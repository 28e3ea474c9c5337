"""Provisioning over the warehouse: derived memberships and roles, the diff against what the application has
acknowledged, the change ledger (an outbox) and the users' history. Plain functions over a DuckDB connection; the
caller owns the transaction (``Warehouse.write()``), so one organization is written all or nothing.

Every function is SQL over whole tables (ARCHITECTURE "Principles"), scoped to one organization, and safe to re-run;
``compute_change_sets(con, None, ...)`` diffs every organization in one pass, which is much faster than a call per
organization when there are many. DuckDB refuses new statements while a result is only partly fetched: fetch yours
to the end (``fetchall``) before calling these functions on the same connection.

Choices worth knowing:

* Memberships and group-derived roles are kept for DEACTIVATED users. Deactivation is reversible in every directory
  (Okta, Entra ID, Google suspend), the directory keeps the user's groups, and a SaaS application keeps the inactive
  user (who cannot sign in) with their memberships, so a reactivation restores access exactly and without a burst of
  changes. Only deletion (a tombstone) removes a user's memberships and roles. ``default_role`` is the exception: it
  is given to active users only (SPEC), so deactivating a user revokes it.
* One user change per user per diff. ``create``/``update``/``reactivate``/``deactivate`` all carry the full desired
  record (``user_id, email, given_name, family_name, preferred_username, active``); the application applies it as a
  whole, so a rename that comes with a deactivation is one ``deactivate``. ``delete`` carries ``{"user_id"}``.
* ``change_id`` = hash(organization, entity, op, key, canonical payload, generation), where generation is how many
  changes of that entity key the application has acknowledged. The same diff gives the same ids; a changed payload
  a new id; and a change that recurs after the application applied its opposite (deactivate, reactivate,
  deactivate) a new id, so that the application's idempotency never swallows it.
* Statuses: ``pending``, ``delivered``, ``failed``, ``held``, ``dead`` (SPEC) and ``superseded``: a change that is no
  longer in the diff (a newer change replaced it or the directory went back) and is never sent. A change whose
  delivery failed in transport may have been applied (``in_doubt``): it is superseded only when the diff has a newer
  change for the same key, which the application applies after it; otherwise it is retried, so the application's
  state becomes known again and the next diff repairs it.
* A change the application rejects is ``failed`` with ``last_error = 'rejected: ...'`` and retried on the backoff (a
  rejection is often an ordering effect, e.g. a membership of a user whose create failed), ``dead`` after
  ``max_attempts``.
* Mass-deprovisioning guard: per organization, when the diff's unapproved deactivations plus deletions of active
  users exceed ``threshold`` x active delivered users AND ``min_users``, every deactivate/delete in the diff, and the
  membership removals and role revocations of those users, is ``held``. ``approve`` releases them and stamps
  ``organization_settings.approved_at``; changes created up to that moment are approved and no longer count.
  ``organization_settings.deprovision_threshold`` / ``deprovision_min_users`` (set at run time) win over the
  role-mapping file. If the diff falls under the threshold again, held changes are released without approval.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import duckdb

from scim_pipeline.resources.application import DELIVERY_RANK
from scim_pipeline.role_mapping import GuardSettings, RoleMapping

if TYPE_CHECKING:
    import pandas as pd

# Delivery order within one organization: the protocol's (SPEC "Application delivery protocol"), defined once.
_RANK_SQL = "CASE " + " ".join(
    f"WHEN entity = '{e}' AND op = '{o}' THEN {r}" for (e, o), r in DELIVERY_RANK.items()
) + " ELSE 9 END"


Organizations = str | Sequence[str] | None  # one organization, several, or None for every organization


def _scope(org_id: Organizations, column: str = "organization_id") -> str:
    """A filter on the organization(s) in $org, or none when ``org_id`` is None (every organization)."""
    if org_id is None:
        return "true"
    return f"{column} = $org" if isinstance(org_id, str) else f"list_contains($org, {column})"


def _params(org_id: Organizations, **extra: Any) -> dict[str, Any]:
    if org_id is None:
        return extra
    return {"org": org_id if isinstance(org_id, str) else list(org_id)} | extra


def _count(result: duckdb.DuckDBPyConnection) -> int:
    rows = result.fetchall()  # to the end: DuckDB refuses new work while a result is unfinished
    return int(rows[0][0]) if rows else 0


# --------------------------------------------------------------------------------------------------------------------
# Derived state


def derive_memberships(con: duckdb.DuckDBPyConnection, org_id: str) -> int:
    """Replace the organization's ``group_memberships`` with the raw memberships of live users in live groups
    (deactivated users included, see the module's notes). Returns the number of memberships."""
    con.execute("DELETE FROM group_memberships WHERE organization_id = $org", {"org": org_id})
    return _count(con.execute(
        """
        INSERT INTO group_memberships (organization_id, group_id, user_id, group_name)
        SELECT $org, m.group_id, m.user_id, g.display_name
        FROM directory_user_groups m
        JOIN directory_users u ON u.user_id = m.user_id AND u.organization_id = $org AND u.deleted_at IS NULL
        JOIN directory_groups g ON g.group_id = m.group_id AND g.organization_id = $org AND g.deleted_at IS NULL
        WHERE m.organization_id = $org
        """,
        {"org": org_id},
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


def derive_roles(con: duckdb.DuckDBPyConnection, org_id: str, mapping: RoleMapping) -> int:
    """Replace the organization's ``role_assignments`` (live users only) from ``group_memberships``, the mapping's
    rules and, unless switched off, the directories' own group-to-role assignments; ``default_role`` for active users
    with no other role. One row per (user, role); ``source`` is the first grant: ``rule:<n>:<pattern>`` in file
    order, then ``directory:<group_id>``, else ``default``. Returns the number of assignments."""
    _load_rules(con, mapping)
    con.execute("DELETE FROM role_assignments WHERE organization_id = $org", {"org": org_id})
    return _count(con.execute(
        r"""
        INSERT INTO role_assignments (organization_id, user_id, role_name, source)
        WITH group_roles AS (
            SELECT g.group_id, r.role_name, r.source, r.priority
            FROM directory_groups g
            JOIN _role_rules r
              ON (r.organization_id IS NULL OR r.organization_id = g.organization_id)
             AND (g.display_name ILIKE r.name_pattern ESCAPE '\' OR g.group_id ILIKE r.id_pattern ESCAPE '\')
            WHERE g.organization_id = $org AND g.deleted_at IS NULL
            UNION ALL
            SELECT a.group_id, a.role_name, 'directory:' || a.group_id, 1000000000
            FROM (
                SELECT unnest(from_json(role_assignments, '[{"group_id": "VARCHAR", "role_name": "VARCHAR"}]')) AS a
                FROM directories
                WHERE organization_id = $org AND $use_directory
            )
            WHERE coalesce(a.role_name, '') <> '' AND a.group_id IS NOT NULL
        ),
        granted AS (
            SELECT m.user_id, gr.role_name, arg_min(gr.source, (gr.priority, gr.source)) AS source
            FROM group_memberships m
            JOIN group_roles gr ON gr.group_id = m.group_id
            WHERE m.organization_id = $org
            GROUP BY m.user_id, gr.role_name
        )
        SELECT $org, user_id, role_name, source FROM granted
        UNION ALL
        SELECT $org, u.user_id, $default_role, 'default'
        FROM directory_users u
        WHERE $default_role IS NOT NULL
          AND u.organization_id = $org AND u.deleted_at IS NULL AND coalesce(u.active, true)
          AND NOT EXISTS (SELECT 1 FROM granted g WHERE g.user_id = u.user_id)
        """,
        {"org": org_id, "use_directory": mapping.use_directory_role_assignments, "default_role": mapping.default_role},
    ))


def desired_state(con: duckdb.DuckDBPyConnection, org_id: str) -> dict[str, pd.DataFrame]:
    """The organization's desired application state (the ``desired_*`` views) as DataFrames: users, memberships,
    roles. For inspection and tests; the diff reads the views directly."""
    return {
        name: con.execute(f"SELECT * EXCLUDE (organization_id) FROM desired_{name} WHERE organization_id = $org "
                          f"ORDER BY ALL", {"org": org_id}).df()
        for name in ("users", "memberships", "roles")
    }


# --------------------------------------------------------------------------------------------------------------------
# Diff and ledger

# The diff. Whole-table joins over millions of string keys are what costs here, so each entity is first compared by
# 64-bit fingerprints (DuckDB's hash): users by a hash of their mapped fields, memberships per user by the XOR of
# their groups' hashes (and their count), roles by a hash of the whole row, with the columns re-checked so that a hash
# collision yields both changes instead of none. Payloads are built only for what differs. A real difference is
# missed only if two different 64-bit fingerprints collide: about 2^-64 per changed row.
_DIFF_SQL = """
CREATE OR REPLACE TEMP TABLE _diff AS
WITH user_diff AS (
    SELECT coalesce(d.organization_id, h.organization_id) AS organization_id,
           coalesce(d.user_id, h.user_id) AS user_id,
           CASE WHEN h.user_id IS NULL THEN 'create'
                WHEN d.user_id IS NULL THEN 'delete'
                WHEN d.active IS DISTINCT FROM h.active THEN CASE WHEN d.active THEN 'reactivate' ELSE 'deactivate' END
                ELSE 'update'
           END AS op
    FROM (SELECT organization_id, user_id, active,
                 hash(email, given_name, family_name, preferred_username) AS fp
          FROM desired_users WHERE {scope}) d
    FULL JOIN (SELECT organization_id, user_id, active,
                      hash(email, given_name, family_name, preferred_username) AS fp
               FROM delivered_users WHERE {scope}) h
      ON d.organization_id = h.organization_id AND d.user_id = h.user_id
    WHERE d.user_id IS NULL OR h.user_id IS NULL OR d.active IS DISTINCT FROM h.active OR d.fp <> h.fp
),
users AS (
    SELECT x.organization_id, 'user' AS entity, x.op, x.user_id, x.user_id AS entity_key,
           CASE WHEN x.op = 'delete' THEN json_object('user_id', x.user_id)
                ELSE json_object('user_id', u.user_id, 'email', u.email, 'given_name', u.given_name,
                                 'family_name', u.family_name, 'preferred_username', u.preferred_username,
                                 'active', u.active)
           END AS payload
    FROM user_diff x
    LEFT JOIN (SELECT * FROM desired_users WHERE {scope}) u
      ON u.organization_id = x.organization_id AND u.user_id = x.user_id
),
membership_users AS (  -- hashes of the users whose set of (organization, group) differs: every membership on both
    SELECT u                 -- sides cancels out of the XOR; the integer key groups fast, and a collision only brings
    FROM (SELECT hash(user_id) AS u, hash(organization_id, group_id) AS h   -- another user into the exact comparison
          FROM desired_memberships WHERE {scope}
          UNION ALL
          SELECT hash(user_id), hash(organization_id, group_id) FROM delivered_memberships WHERE {scope})
    GROUP BY u
    HAVING bit_xor(h) <> 0
),
memberships AS (
    SELECT coalesce(d.organization_id, h.organization_id) AS organization_id,
           'membership' AS entity,
           CASE WHEN h.user_id IS NULL THEN 'add' ELSE 'remove' END AS op,
           coalesce(d.user_id, h.user_id) AS user_id,
           coalesce(d.group_id, h.group_id) || '/' || coalesce(d.user_id, h.user_id) AS entity_key,
           json_object('group_id', coalesce(d.group_id, h.group_id), 'user_id', coalesce(d.user_id, h.user_id),
                       'group_name', coalesce(d.group_name, h.group_name)) AS payload
    FROM (SELECT * FROM desired_memberships WHERE {scope}
          AND hash(user_id) IN (SELECT u FROM membership_users)) d
    FULL JOIN (SELECT * FROM delivered_memberships WHERE {scope}
               AND hash(user_id) IN (SELECT u FROM membership_users)) h
      ON d.organization_id = h.organization_id AND d.group_id = h.group_id AND d.user_id = h.user_id
    WHERE d.user_id IS NULL OR h.user_id IS NULL
),
role_pairs AS (
    SELECT d.organization_id AS d_org, d.user_id AS d_user, d.role_name AS d_role,
           h.organization_id AS h_org, h.user_id AS h_user, h.role_name AS h_role
    -- role_assignments rather than the DISTINCT view: derive_roles writes one row per role, and a duplicate could
    -- only repeat a grant, which DISTINCT below removes
    FROM (SELECT organization_id, user_id, role_name, hash(organization_id, user_id, role_name) AS k
          FROM role_assignments WHERE {scope}) d
    FULL JOIN (SELECT *, hash(organization_id, user_id, role_name) AS k FROM delivered_roles WHERE {scope}) h
      ON d.k = h.k
    WHERE d.k IS NULL OR h.k IS NULL
       OR d.organization_id <> h.organization_id OR d.user_id <> h.user_id OR d.role_name <> h.role_name
),
roles AS (
    SELECT DISTINCT d_org AS organization_id, 'role' AS entity, 'grant' AS op, d_user AS user_id,
           d_user || '/' || d_role AS entity_key,
           json_object('user_id', d_user, 'role_name', d_role) AS payload
    FROM role_pairs WHERE d_user IS NOT NULL
    UNION ALL
    SELECT h_org, 'role', 'revoke', h_user, h_user || '/' || h_role,
           json_object('user_id', h_user, 'role_name', h_role)
    FROM role_pairs WHERE h_user IS NOT NULL
),
changes AS (
    SELECT * FROM users
    UNION ALL SELECT * FROM memberships
    UNION ALL SELECT * FROM roles
)
-- Generation: acknowledged changes per entity key, so that a change recurring after its opposite gets a new id.
-- (In the same statement as the diff: one temporary table fewer to write, about a tenth of the time.)
SELECT r.*,
       'chg_' || md5(concat_ws(chr(31), r.organization_id, r.entity, r.op, r.entity_key, r.payload::VARCHAR,
                               coalesce(g.generation, 0)::VARCHAR)) AS change_id
FROM changes r
LEFT JOIN (
    SELECT c.organization_id, c.entity, c.entity_key, count(*) AS generation
    FROM change_sets c
    SEMI JOIN changes k
      ON k.organization_id = c.organization_id AND k.entity = c.entity AND k.entity_key = c.entity_key
    WHERE c.status = 'delivered' AND {scope_c}
    GROUP BY ALL
) g ON g.organization_id = r.organization_id AND g.entity = r.entity AND g.entity_key = r.entity_key
"""


def _load_guards(con: duckdb.DuckDBPyConnection, guard: GuardSettings | RoleMapping | None) -> None:
    """``_guard_settings``: one default row (organization_id NULL) and the role-mapping file's per-org overrides."""
    if isinstance(guard, RoleMapping):
        default, overrides = guard.guard, list(guard.organization_guards)
    else:
        default, overrides = guard or GuardSettings(), []
    con.execute("CREATE OR REPLACE TEMP TABLE _guard_settings (organization_id VARCHAR, threshold DOUBLE, min_users INTEGER)")
    con.executemany(
        "INSERT INTO _guard_settings VALUES (?, ?, ?)",
        [(None, default.threshold, default.min_users)] + [(o, g.threshold, g.min_users) for o, g in overrides],
    )


_GUARD_SQL = """
CREATE OR REPLACE TEMP TABLE _guard AS
WITH orgs AS (
    SELECT organization_id FROM _diff GROUP BY 1
),
deprovisions AS (  -- unapproved deactivations, and deletions of active users
    SELECT d.organization_id, count(*) AS n
    FROM _diff d
    JOIN change_sets c ON c.change_id = d.change_id
    LEFT JOIN organization_settings s ON s.organization_id = d.organization_id
    LEFT JOIN delivered_users h ON h.organization_id = d.organization_id AND h.user_id = d.user_id
    WHERE d.entity = 'user' AND (d.op = 'deactivate' OR (d.op = 'delete' AND h.active))
      AND (s.approved_at IS NULL OR c.created_at > s.approved_at)
    GROUP BY 1
),
active AS (
    SELECT organization_id, count(*) AS n FROM delivered_users WHERE {scope} AND active GROUP BY 1
)
SELECT o.organization_id,
       coalesce(p.n, 0) AS deprovisions,
       coalesce(a.n, 0) AS active_users,
       coalesce(s.deprovision_threshold, f.threshold, dflt.threshold) AS threshold,
       coalesce(s.deprovision_min_users, f.min_users, dflt.min_users) AS min_users,
       coalesce(p.n, 0) > coalesce(s.deprovision_threshold, f.threshold, dflt.threshold) * coalesce(a.n, 0)
         AND coalesce(p.n, 0) > coalesce(s.deprovision_min_users, f.min_users, dflt.min_users) AS tripped
FROM orgs o
LEFT JOIN deprovisions p USING (organization_id)
LEFT JOIN active a USING (organization_id)
LEFT JOIN organization_settings s USING (organization_id)
LEFT JOIN _guard_settings f ON f.organization_id = o.organization_id
CROSS JOIN (SELECT * FROM _guard_settings WHERE organization_id IS NULL) dflt
"""

# The changes to hold: in a tripped organization, unapproved deactivations/deletes and the removals and revocations
# of the same users, so that nothing of a held deprovisioning is half-done.
_HOLD_SQL = """
CREATE OR REPLACE TEMP TABLE _hold AS
WITH candidates AS (
    SELECT d.change_id, d.organization_id, d.entity, d.op, d.user_id
    FROM _diff d
    JOIN _guard g ON g.organization_id = d.organization_id AND g.tripped
    JOIN change_sets c ON c.change_id = d.change_id
    LEFT JOIN organization_settings s ON s.organization_id = d.organization_id
    WHERE c.status IN ('pending', 'held') AND (s.approved_at IS NULL OR c.created_at > s.approved_at)
),
held_users AS (
    SELECT DISTINCT organization_id, user_id FROM candidates WHERE entity = 'user' AND op IN ('deactivate', 'delete')
)
SELECT c.change_id
FROM candidates c
SEMI JOIN held_users u ON u.organization_id = c.organization_id AND u.user_id = c.user_id
WHERE (c.entity = 'user' AND c.op IN ('deactivate', 'delete')) OR c.op IN ('remove', 'revoke')
"""


def compute_change_sets(
    con: duckdb.DuckDBPyConnection,
    org_id: Organizations,
    now: datetime,
    guard: GuardSettings | RoleMapping | None = None,
) -> dict[str, Any]:
    """Diff the desired state against ``delivered_*`` for one organization (a list: those organizations;
    ``None``: all organizations; either in one pass) and bring the ledger in line: new changes are inserted ``pending`` (or ``held`` by the guard), changes
    no longer in the diff are ``superseded``, superseded ones back in the diff are pending again.

    ``guard`` is the default guard setting, or the role mapping (its per-organization overrides apply).
    Returns counts: ``"<entity>.<op>"`` for each kind of change in the diff, ``total`` (the diff),
    ``inserted``, ``superseded``, ``held`` (held now, in the diff), and ``guard_tripped`` (organization ids)."""
    scope = _scope(org_id)
    params = _params(org_id)
    con.execute(_DIFF_SQL.format(scope=scope, scope_c=_scope(org_id, "c.organization_id")), params)

    inserted = _count(con.execute(
        """
        INSERT INTO change_sets (change_id, organization_id, entity, op, entity_key, payload, status, attempts,
                                 created_at, in_doubt)
        SELECT change_id, organization_id, entity, op, entity_key, payload, 'pending', 0, $now, false
        FROM _diff d
        WHERE NOT EXISTS (SELECT 1 FROM change_sets c WHERE c.change_id = d.change_id)
        """,
        {"now": now},
    ))
    # Back in the diff after the directory went back and forth: send it after all.
    con.execute(
        "UPDATE change_sets SET status = 'pending' WHERE status = 'superseded' "
        "AND change_id IN (SELECT change_id FROM _diff)"
    )
    superseded = _count(con.execute(
        f"""
        UPDATE change_sets c SET status = 'superseded'
        WHERE {_scope(org_id, "c.organization_id")}
          AND c.status IN ('pending', 'held', 'failed', 'dead')
          AND NOT EXISTS (SELECT 1 FROM _diff d WHERE d.change_id = c.change_id)
          AND (c.status IN ('pending', 'held') OR NOT coalesce(c.in_doubt, false)
               OR EXISTS (SELECT 1 FROM _diff d WHERE d.organization_id = c.organization_id
                          AND d.entity = c.entity AND d.entity_key = c.entity_key))
        """,
        params,
    ))

    _load_guards(con, guard)
    con.execute(_GUARD_SQL.format(scope=scope), params)
    con.execute(_HOLD_SQL)
    con.execute(
        """
        UPDATE change_sets c
        SET status = CASE WHEN c.status = 'pending' THEN 'held' ELSE 'pending' END
        WHERE c.change_id IN (SELECT change_id FROM _diff)
          AND ((c.status = 'pending' AND c.change_id IN (SELECT change_id FROM _hold))
               OR (c.status = 'held' AND c.change_id NOT IN (SELECT change_id FROM _hold)))
        """
    )

    counts: dict[str, Any] = {
        f"{entity}.{op}": n
        for entity, op, n in con.execute("SELECT entity, op, count(*) FROM _diff GROUP BY ALL ORDER BY ALL").fetchall()
    }
    counts["total"] = sum(v for v in counts.values())
    counts["inserted"] = inserted
    counts["superseded"] = superseded
    counts["held"] = _count(con.execute(
        "SELECT count(*) FROM change_sets WHERE status = 'held' AND change_id IN (SELECT change_id FROM _diff)"
    ))
    counts["guard_tripped"] = [r[0] for r in con.execute(
        "SELECT organization_id FROM _guard WHERE tripped ORDER BY 1").fetchall()]
    return counts


def guard_status(con: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    """The guard's figures per organization from the last ``compute_change_sets`` on this connection."""
    return con.execute("SELECT * FROM _guard ORDER BY organization_id").df().to_dict("records")


def approve(con: duckdb.DuckDBPyConnection, org_id: str, now: datetime) -> int:
    """Release the organization's held changes to pending and record the approval (changes created up to ``now``
    are approved: the guard no longer counts or holds them). Returns the number released."""
    released = _count(con.execute(
        "UPDATE change_sets SET status = 'pending' WHERE organization_id = $org AND status = 'held'", {"org": org_id}
    ))
    con.execute(
        """
        INSERT INTO organization_settings (organization_id, approved_at) VALUES ($org, $now)
        ON CONFLICT (organization_id) DO UPDATE SET approved_at = excluded.approved_at
        """,
        {"org": org_id, "now": now},
    )
    return released


def ready_changes(
    con: duckdb.DuckDBPyConnection, org_id: str, now: datetime, max_attempts: int, limit: int | None = None
) -> list[dict[str, Any]]:
    """Changes to send now, in delivery order: pending ones, and failed ones whose backoff has passed (held, dead,
    superseded and delivered ones never). Each is ``{"change_id", "organization_id", "entity", "op", "key", "data",
    "attempts"}`` where ``data`` is the parsed payload, ready for the application's ``changes`` list."""
    rows = con.execute(
        f"""
        SELECT change_id, organization_id, entity, op, entity_key, payload, attempts
        FROM change_sets
        WHERE organization_id = $org AND attempts < $max_attempts
          AND (status = 'pending' OR (status = 'failed' AND coalesce(next_attempt_at, created_at) <= $now))
        ORDER BY {_RANK_SQL}, created_at, entity_key
        {"LIMIT $limit" if limit is not None else ""}
        """,
        {"org": org_id, "now": now, "max_attempts": max_attempts} | ({"limit": limit} if limit is not None else {}),
    ).fetchall()
    return [
        {"change_id": c, "organization_id": o, "entity": e, "op": op, "key": k, "data": json.loads(p), "attempts": a}
        for c, o, e, op, k, p, a in rows
    ]


def _backoff_sql(base_s: float, cap_s: float) -> str:
    """Next attempt: exponential in the attempts made so far, capped, with jitter in [50%, 100%]."""
    return (f"$now + to_microseconds(CAST(least({cap_s}, {base_s} * pow(2, attempts)) "
            f"* (0.5 + random() / 2) * 1e6 AS BIGINT))")


def record_results(
    con: duckdb.DuckDBPyConnection,
    results: Iterable[Mapping[str, Any]],
    now: datetime,
    max_attempts: int = 8,
    backoff_s: float = 30.0,
    backoff_cap_s: float = 3600.0,
) -> dict[str, int]:
    """Record the application's per-change answers (``{"change_id", "status": "applied"|"rejected", "error"}``).

    Applied: ``delivered`` (attempts+1, ``delivered_at``), and the change is applied to ``delivered_*``: the
    delivered state changes only here, from acknowledgements. Rejected: ``failed`` with ``last_error = 'rejected:
    <error>'`` and a backoff, ``dead`` once ``max_attempts`` are used. Answers for already delivered or unknown
    changes are ignored, so recording the same answers twice is harmless. Returns ``{"applied", "rejected"}``."""
    import pandas as pd  # here, not at import: every run process imports this module

    frame = pd.DataFrame(
        [(str(r["change_id"]), r.get("status") == "applied", r.get("error")) for r in results],
        columns=["change_id", "applied", "error"],
    ).astype({"change_id": object, "error": object})
    if frame.empty:
        return {"applied": 0, "rejected": 0}
    con.register("_results_in", frame)
    try:
        con.execute(
            """
            CREATE OR REPLACE TEMP TABLE _results AS
            SELECT c.change_id, c.organization_id, c.entity, c.op, c.payload, c.created_at, r.applied, r.error
            FROM (SELECT * FROM _results_in QUALIFY row_number() OVER (PARTITION BY change_id) = 1) r
            JOIN change_sets c ON c.change_id = r.change_id
            WHERE c.status <> 'delivered'
            """
        )
    finally:
        con.unregister("_results_in")
    _apply_to_delivered(con)
    applied = _count(con.execute(
        """
        UPDATE change_sets c
        SET status = 'delivered', delivered_at = $now, attempts = c.attempts + 1, last_error = NULL,
            next_attempt_at = NULL, in_doubt = false
        FROM _results r WHERE r.change_id = c.change_id AND r.applied
        """,
        {"now": now},
    ))
    rejected = _count(con.execute(
        f"""
        UPDATE change_sets c
        SET attempts = c.attempts + 1,
            status = CASE WHEN c.attempts + 1 >= $max_attempts THEN 'dead' ELSE 'failed' END,
            last_error = 'rejected: ' || coalesce(r.error, 'no reason given'),
            next_attempt_at = {_backoff_sql(backoff_s, backoff_cap_s)},
            in_doubt = false
        FROM _results r WHERE r.change_id = c.change_id AND NOT r.applied
        """,
        {"now": now, "max_attempts": max_attempts},
    ))
    return {"applied": applied, "rejected": rejected}


def _apply_to_delivered(con: duckdb.DuckDBPyConnection) -> None:
    """Apply acknowledged changes (``_results`` with ``applied``) to ``delivered_*``, as the application did:
    in delivery order, so adds come before removes and the newest record of a user wins."""
    con.execute(
        """
        INSERT INTO delivered_users (organization_id, user_id, email, given_name, family_name, preferred_username, active)
        SELECT organization_id, payload->>'user_id', payload->>'email', payload->>'given_name', payload->>'family_name',
               payload->>'preferred_username', CAST(payload->>'active' AS BOOLEAN)
        FROM _results
        WHERE applied AND entity = 'user' AND op IN ('create', 'update', 'reactivate', 'deactivate')
        QUALIFY row_number() OVER (PARTITION BY organization_id, payload->>'user_id' ORDER BY created_at DESC) = 1
        ON CONFLICT (organization_id, user_id) DO UPDATE SET
            email = excluded.email, given_name = excluded.given_name, family_name = excluded.family_name,
            preferred_username = excluded.preferred_username, active = excluded.active
        """
    )
    con.execute(
        """
        INSERT INTO delivered_memberships (organization_id, group_id, user_id, group_name)
        SELECT DISTINCT ON (organization_id, payload->>'group_id', payload->>'user_id')
               organization_id, payload->>'group_id', payload->>'user_id', payload->>'group_name'
        FROM _results WHERE applied AND entity = 'membership' AND op = 'add'
        ON CONFLICT (organization_id, group_id, user_id) DO UPDATE SET group_name = excluded.group_name
        """
    )
    con.execute(
        """
        INSERT INTO delivered_roles (organization_id, user_id, role_name)
        SELECT DISTINCT organization_id, payload->>'user_id', payload->>'role_name'
        FROM _results WHERE applied AND entity = 'role' AND op = 'grant'
        ON CONFLICT DO NOTHING
        """
    )
    con.execute(
        """
        DELETE FROM delivered_memberships m USING _results r
        WHERE r.applied AND r.entity = 'membership' AND r.op = 'remove' AND m.organization_id = r.organization_id
          AND m.group_id = r.payload->>'group_id' AND m.user_id = r.payload->>'user_id'
        """
    )
    con.execute(
        """
        DELETE FROM delivered_roles d USING _results r
        WHERE r.applied AND r.entity = 'role' AND r.op = 'revoke' AND d.organization_id = r.organization_id
          AND d.user_id = r.payload->>'user_id' AND d.role_name = r.payload->>'role_name'
        """
    )
    # A deleted user is removed from the application with everything attached to it.
    for table in ("delivered_memberships", "delivered_roles", "delivered_users"):
        con.execute(
            f"""
            DELETE FROM {table} t USING _results r
            WHERE r.applied AND r.entity = 'user' AND r.op = 'delete'
              AND t.organization_id = r.organization_id AND t.user_id = r.payload->>'user_id'
            """
        )


def record_failure(
    con: duckdb.DuckDBPyConnection,
    change_ids: Iterable[str],
    error: str,
    now: datetime,
    max_attempts: int = 8,
    backoff_s: float = 30.0,
    backoff_cap_s: float = 3600.0,
) -> dict[str, int]:
    """A batch that got no answer (429, 5xx, timeout, connection error after the delivery's own retries): each
    change becomes ``failed`` with attempts+1 and ``next_attempt_at = now + min(cap, backoff * 2^attempts)`` with
    jitter, or ``dead`` once ``max_attempts`` are used. The application may have applied them: they are marked
    ``in_doubt`` (see the module's notes). Returns ``{"failed", "dead"}``."""
    ids = list(dict.fromkeys(str(c) for c in change_ids))
    if not ids:
        return {"failed": 0, "dead": 0}
    rows = con.execute(
        f"""
        UPDATE change_sets
        SET attempts = attempts + 1,
            status = CASE WHEN attempts + 1 >= $max_attempts THEN 'dead' ELSE 'failed' END,
            last_error = $error,
            next_attempt_at = {_backoff_sql(backoff_s, backoff_cap_s)},
            in_doubt = true
        WHERE change_id IN (SELECT unnest($ids)) AND status <> 'delivered'
        RETURNING status
        """,
        {"ids": ids, "error": error, "now": now, "max_attempts": max_attempts},
    ).fetchall()
    dead = sum(1 for (s,) in rows if s == "dead")
    return {"failed": len(rows) - dead, "dead": dead}


# --------------------------------------------------------------------------------------------------------------------
# History


def update_user_history(con: duckdb.DuckDBPyConnection, org_id: str, now: datetime) -> dict[str, int]:
    """Type-2 history of the organization's users in ``directory_users_history``: an interval is closed
    (``valid_to = now``) and a new one opened whenever a user's attributes, ``active``, deleted state or roles
    change (compared by ``row_hash`` over the canonical fields, roles sorted). Returns ``{"closed", "opened"}``."""
    con.execute(
        """
        CREATE OR REPLACE TEMP TABLE _history_now AS
        SELECT *, md5(to_json(struct_pack(email, given_name, family_name, preferred_username, active, deleted,
                                          roles))::VARCHAR) AS row_hash
        FROM (
            SELECT u.user_id, u.organization_id, u.email, u.given_name, u.family_name, u.preferred_username,
                   coalesce(u.active, true) AS active, u.deleted_at IS NOT NULL AS deleted,
                   coalesce(r.roles, []::VARCHAR[]) AS roles
            FROM directory_users u
            LEFT JOIN (
                SELECT user_id, list_sort(list(DISTINCT role_name)) AS roles
                FROM role_assignments WHERE organization_id = $org GROUP BY user_id
            ) r ON r.user_id = u.user_id
            WHERE u.organization_id = $org
        )
        """,
        {"org": org_id},
    )
    closed = _count(con.execute(
        """
        UPDATE directory_users_history h SET valid_to = $now
        WHERE h.organization_id = $org AND h.valid_to IS NULL
          AND NOT EXISTS (SELECT 1 FROM _history_now n WHERE n.user_id = h.user_id AND n.row_hash = h.row_hash)
        """,
        {"org": org_id, "now": now},
    ))
    opened = _count(con.execute(
        """
        INSERT INTO directory_users_history (user_id, organization_id, valid_from, valid_to, email, given_name,
                                             family_name, preferred_username, active, deleted, roles, row_hash)
        SELECT user_id, organization_id, $now, NULL, email, given_name, family_name, preferred_username, active,
               deleted, roles, row_hash
        FROM _history_now n
        WHERE NOT EXISTS (SELECT 1 FROM directory_users_history h
                          WHERE h.organization_id = $org AND h.user_id = n.user_id AND h.valid_to IS NULL)
        """,
        {"org": org_id, "now": now},
    ))
    return {"closed": closed, "opened": opened}
