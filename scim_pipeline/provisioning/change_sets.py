"""The change sets: the diff between what the application should have (the ``desired_*`` views over the derived
state) and what it has acknowledged (``delivered_*``), brought into the ledger (``change_sets``, an outbox), and
the mass-deprovisioning guard that holds what needs approval. Plain functions over a DuckDB connection; the caller
owns the transaction (``Warehouse.write()``), so one organization is written all or nothing.

Every function is SQL over whole tables, safe to re-run; ``compute_change_sets(con, None, ...)`` diffs every
organization in one pass, which is much faster than a call per organization when there are many. DuckDB refuses new
statements while a result is only partly fetched: fetch yours to the end (``fetchall``) before calling these
functions on the same connection.

Choices worth knowing:

* One user change per user per diff. ``create``/``update``/``reactivate``/``deactivate`` all carry the full desired
  record (``user_id, email, given_name, family_name, preferred_username, active``); the application applies it as a
  whole, so a rename that comes with a deactivation is one ``deactivate``. ``delete`` carries ``{"user_id"}``.
* ``change_id`` = hash(organization, entity, op, key, canonical payload, generation), where generation is how many
  changes of that entity key the application has acknowledged. The same diff gives the same ids; a changed payload
  a new id; and a change that recurs after the application applied its opposite (deactivate, reactivate,
  deactivate) a new id, so that the application's idempotency never swallows it.
* Statuses: ``pending``, ``delivered``, ``failed``, ``held``, ``dead`` and ``superseded``: a change that is no
  longer in the diff (a newer change replaced it or the directory went back) and is never sent. A change whose
  delivery failed in transport may have been applied (``in_doubt``): it is superseded only when the diff has a newer
  change for the same key, which the application applies after it; otherwise it is sent again, re-derived first
  against the desired state (``ledger.rederive_in_doubt``), so the application's state becomes known again.
* ``dead`` (no attempts left) is not the end: a dead change is still in the diff (else it is superseded), and a full
  sync (``full=True``), a delivery that reaches the application again after a cool-down, and ``scim-pipeline
  retry`` give it a fresh round of attempts under the same change id (``ledger.revive_dead``).
* ``held`` says why in ``hold_reason``: ``directory disabled`` (the user's directory is switched off; released
  when it is enabled again, ``apply_directory_holds``) or ``mass deprovisioning guard`` (until ``approve``).
* Mass-deprovisioning guard, per organization, over a rolling window (``window_hours``, default 24) and across
  runs: the users deprovisioned (deactivated, or deleted while active) by unapproved changes of the ledger that are
  not superseded, created within the window or not delivered yet, against ``threshold`` x the active users and
  ``min_users``; past both, every deactivate/delete in the diff, and the membership removals and role revocations
  of those users, is ``held``. Users losing a membership or a role count the same way on their own, and past that
  point every removal and revocation in the diff is held (a group rename that strips a role from everyone).
  ``approve`` releases them and stamps ``organization_settings.approved_at``; changes created up to that moment are
  approved and no longer count. ``organization_settings.deprovision_threshold`` / ``deprovision_min_users`` /
  ``deprovision_window_hours`` (set at run time) win over the role-mapping file. The guard is evaluated again at
  every run: held changes are released without approval when they fall under it again (the settings changed, or
  the directory went back), but not by time passing (the window reaches back from the oldest held change).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import duckdb

from scim_pipeline.provisioning.ledger import revive_dead
from scim_pipeline.provisioning.role_mapping import GuardSettings, RoleMapping
from scim_pipeline.warehouse.sql import Organizations, first_int, org_params, org_scope

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
groups AS (  -- only the groups the application holds as resources (the SCIM 2.0 protocol's scim_ids): renamed
    SELECT s.organization_id, 'group' AS entity,   -- or deleted in the directory. A group reaches the application
           CASE WHEN g.group_id IS NULL OR g.deleted_at IS NOT NULL THEN 'delete' ELSE 'update' END AS op,  -- with
           NULL AS user_id, s.external_id AS entity_key,   -- its first member; the `changes` protocol has no groups
           json_object('group_id', s.external_id, 'display_name', g.display_name) AS payload
    FROM (SELECT * FROM scim_ids WHERE resource_type = 'Group' AND {scope}) s
    LEFT JOIN directory_groups g ON g.group_id = s.external_id AND g.organization_id = s.organization_id
    WHERE g.group_id IS NULL OR g.deleted_at IS NOT NULL OR g.display_name IS DISTINCT FROM s.display_name
),
changes AS (
    SELECT * FROM users
    UNION ALL SELECT * FROM memberships
    UNION ALL SELECT * FROM roles
    UNION ALL SELECT * FROM groups
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


HOLD_GUARD = "mass deprovisioning guard"  # held until `scim-pipeline approve --org`
HOLD_DIRECTORY = "directory disabled"  # held until the directory is enabled again


def _load_guards(con: duckdb.DuckDBPyConnection, guard: GuardSettings | RoleMapping | None) -> None:
    """``_guard_settings``: one default row (organization_id NULL) and the role-mapping file's per-org overrides."""
    if isinstance(guard, RoleMapping):
        default, overrides = guard.guard, list(guard.organization_guards)
    else:
        default, overrides = guard or GuardSettings(), []
    con.execute("CREATE OR REPLACE TEMP TABLE _guard_settings (organization_id VARCHAR, threshold DOUBLE, "
                "min_users INTEGER, window_hours DOUBLE)")
    con.executemany(
        "INSERT INTO _guard_settings VALUES (?, ?, ?, ?)",
        [(None, default.threshold, default.min_users, default.window_hours)]
        + [(o, g.threshold, g.min_users, g.window_hours) for o, g in overrides],
    )


# The guard's figures per organization of the diff. What counts comes from the ledger, not from this run's diff
# alone, so that a mass deprovisioning spread over many small runs is caught too: every unapproved change that takes
# access away (a deactivation, a deletion of a user the application had active, a membership removal, a role
# revocation) and is not superseded, created within the window or not delivered yet. The window reaches back from
# now, or from the oldest change the guard holds: the deprovisions that tripped it keep counting while it holds, so
# time alone never releases anything. The base is the users active before the window's deprovisions (the active
# users now, plus those the window already deactivated or deleted), which the deprovisions themselves do not shrink.
_GUARD_SQL = """
CREATE OR REPLACE TEMP TABLE _guard AS
WITH orgs AS (
    SELECT organization_id FROM _diff GROUP BY 1
),
settings AS (
    SELECT o.organization_id, s.approved_at,
           coalesce(s.deprovision_threshold, f.threshold, dflt.threshold) AS threshold,
           coalesce(s.deprovision_min_users, f.min_users, dflt.min_users) AS min_users,
           coalesce(s.deprovision_window_hours, f.window_hours, dflt.window_hours) AS window_hours
    FROM orgs o
    LEFT JOIN organization_settings s USING (organization_id)
    LEFT JOIN _guard_settings f ON f.organization_id = o.organization_id
    CROSS JOIN (SELECT * FROM _guard_settings WHERE organization_id IS NULL) dflt
),
windows AS (
    SELECT s.*, least($now, h.oldest) - to_microseconds(CAST(s.window_hours * 3600e6 AS BIGINT)) AS since
    FROM settings s
    LEFT JOIN (SELECT organization_id, min(created_at) AS oldest FROM change_sets
               WHERE status = 'held' AND hold_reason = '{hold_guard}' AND {scope} GROUP BY 1) h USING (organization_id)
),
counted AS (
    SELECT c.organization_id, c.entity, c.op, c.entity_key, c.status, c.created_at, c.payload ->> 'user_id' AS user_id
    FROM change_sets c
    JOIN windows w USING (organization_id)
    WHERE {scope_c} AND c.status <> 'superseded'
      AND ((c.entity = 'user' AND c.op IN ('deactivate', 'delete'))
           OR (c.entity = 'membership' AND c.op = 'remove') OR (c.entity = 'role' AND c.op = 'revoke'))
      AND (w.approved_at IS NULL OR c.created_at > w.approved_at)
      AND (c.created_at >= w.since OR c.status <> 'delivered')
),
deletes AS (
    SELECT * FROM counted WHERE entity = 'user' AND op = 'delete'
),
acknowledged AS (  -- the acknowledged changes of the users deleted that set whether they are active (an update
    SELECT c.organization_id, c.entity_key, c.delivered_at,   -- carries the state it found, so it is left out)
           CAST(c.payload ->> 'active' AS BOOLEAN) AS active
    FROM change_sets c
    SEMI JOIN deletes d ON d.organization_id = c.organization_id AND d.entity_key = c.entity_key
    WHERE {scope_c} AND c.entity = 'user' AND c.op IN ('create', 'reactivate', 'deactivate') AND c.status = 'delivered'
),
deprovisioned AS (  -- a deletion counts when the application had the user active before it
    SELECT organization_id, user_id, status FROM counted WHERE entity = 'user' AND op = 'deactivate'
    UNION ALL
    SELECT d.organization_id, d.user_id, d.status
    FROM deletes d
    ASOF LEFT JOIN acknowledged a
      ON a.organization_id = d.organization_id AND a.entity_key = d.entity_key AND d.created_at >= a.delivered_at
    WHERE coalesce(a.active, true)
),
deprovisions AS (
    SELECT organization_id, count(DISTINCT user_id) AS n,
           count(DISTINCT user_id) FILTER (WHERE status = 'delivered') AS done
    FROM deprovisioned GROUP BY 1
),
losses AS (
    SELECT organization_id, count(DISTINCT user_id) AS n FROM counted WHERE op IN ('remove', 'revoke') GROUP BY 1
),
active AS (
    SELECT organization_id, count(*) AS n FROM delivered_users WHERE {scope} AND active GROUP BY 1
),
figures AS (
    SELECT w.organization_id, coalesce(p.n, 0) AS deprovisions, coalesce(l.n, 0) AS losses,
           coalesce(a.n, 0) + coalesce(p.done, 0) AS active_users,
           w.threshold, w.min_users, w.window_hours, w.since AS window_start
    FROM windows w
    LEFT JOIN deprovisions p USING (organization_id)
    LEFT JOIN losses l USING (organization_id)
    LEFT JOIN active a USING (organization_id)
)
SELECT *, deprovisions_tripped OR losses_tripped AS tripped
FROM (
    SELECT *,
           deprovisions > threshold * active_users AND deprovisions > min_users AS deprovisions_tripped,
           losses > threshold * active_users AND losses > min_users AS losses_tripped
    FROM figures
)
"""

# The changes to hold, among the diff's unapproved pending ones (and those the guard already holds): where
# deprovisions tripped it, the deactivations and deletes and the removals and revocations of the same users, so that
# nothing of a held deprovisioning is half-done; where losses tripped it, every removal and revocation.
_HOLD_SQL = """
CREATE OR REPLACE TEMP TABLE _hold AS
WITH candidates AS (
    SELECT d.change_id, d.organization_id, d.entity, d.op, d.user_id, d.payload ->> 'group_id' AS group_id,
           g.deprovisions_tripped, g.losses_tripped
    FROM _diff d
    JOIN _guard g ON g.organization_id = d.organization_id AND g.tripped
    JOIN change_sets c ON c.change_id = d.change_id
    LEFT JOIN organization_settings s ON s.organization_id = d.organization_id
    WHERE (c.status = 'pending' OR (c.status = 'held' AND c.hold_reason = '{hold_guard}'))
      AND (s.approved_at IS NULL OR c.created_at > s.approved_at)
),
held_users AS (
    SELECT DISTINCT organization_id, user_id FROM candidates
    WHERE deprovisions_tripped AND entity = 'user' AND op IN ('deactivate', 'delete')
),
held AS (
    SELECT c.change_id, c.organization_id, c.entity, c.group_id
    FROM candidates c
    LEFT JOIN held_users u ON u.organization_id = c.organization_id AND u.user_id = c.user_id
    WHERE (c.deprovisions_tripped AND c.entity = 'user' AND c.op IN ('deactivate', 'delete'))
       OR (c.op IN ('remove', 'revoke') AND (c.losses_tripped OR u.user_id IS NOT NULL))
)
SELECT change_id FROM held
UNION ALL  -- deleting a group removes its members: held while a removal from it is held
SELECT c.change_id FROM candidates c
WHERE c.entity = 'group' AND c.op = 'delete'
  AND EXISTS (SELECT 1 FROM held h WHERE h.organization_id = c.organization_id AND h.entity = 'membership'
              AND h.group_id = c.group_id)
"""


def apply_directory_holds(con: duckdb.DuckDBPyConnection, org_id: Organizations) -> dict[str, Any]:
    """Hold the changes of users whose directory is disabled (pending or failed ones: ``held``, ``hold_reason =
    'directory disabled'``), and release those of directories enabled again to ``pending``. Such changes must not
    reach the application while the customer has switched the directory off, and must not wait unseen either.
    Returns ``{"held", "released", "released_orgs"}``."""
    scope = org_scope(org_id, "c.organization_id")
    params = org_params(org_id)
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE _disabled_users AS
        SELECT u.organization_id, u.user_id
        FROM directory_users u JOIN directories d ON d.directory_id = u.directory_id
        WHERE NOT coalesce(d.enabled, true) AND {org_scope(org_id, "u.organization_id")}
        """,
        params,
    )
    held = first_int(con.execute(
        f"""
        UPDATE change_sets c SET status = 'held', hold_reason = '{HOLD_DIRECTORY}'
        WHERE {scope} AND c.status IN ('pending', 'failed')
          AND EXISTS (SELECT 1 FROM _disabled_users u
                      WHERE u.organization_id = c.organization_id AND u.user_id = c.payload ->> 'user_id')
        """,
        params,
    ))
    released = con.execute(
        f"""
        UPDATE change_sets c SET status = 'pending', hold_reason = NULL
        WHERE {scope} AND c.status = 'held' AND c.hold_reason = '{HOLD_DIRECTORY}'
          AND NOT EXISTS (SELECT 1 FROM _disabled_users u
                          WHERE u.organization_id = c.organization_id AND u.user_id = c.payload ->> 'user_id')
        RETURNING c.organization_id
        """,
        params,
    ).fetchall()
    return {"held": held, "released": len(released), "released_orgs": sorted({r[0] for r in released})}


def compute_change_sets(
    con: duckdb.DuckDBPyConnection,
    org_id: Organizations,
    now: datetime,
    guard: GuardSettings | RoleMapping | None = None,
    full: bool = False,
) -> dict[str, Any]:
    """Diff the desired state against ``delivered_*`` for one organization (a list: those organizations;
    ``None``: all organizations; either in one pass) and bring the ledger in line: new changes are inserted
    ``pending`` (or ``held``), changes no longer in the diff are ``superseded``, superseded ones back in the diff are
    pending again. ``full`` (a full sync, the reconciliation): dead changes still wanted get fresh attempts.

    ``guard`` is the default guard setting, or the role mapping (its per-organization overrides apply).
    Returns counts: ``"<entity>.<op>"`` for each kind of change in the diff, ``total`` (the diff),
    ``inserted``, ``superseded``, ``revived``, ``held`` (held now, in the diff), and ``guard_tripped``
    (organization ids)."""
    scope = org_scope(org_id)
    params = org_params(org_id)
    con.execute(_DIFF_SQL.format(scope=scope, scope_c=org_scope(org_id, "c.organization_id")), params)

    inserted = first_int(con.execute(
        """
        INSERT INTO change_sets (change_id, organization_id, entity, op, entity_key, payload, status, attempts,
                                 created_at, in_doubt)
        SELECT change_id, organization_id, entity, op, entity_key, payload, 'pending', 0, $now, false
        FROM _diff d
        WHERE NOT EXISTS (SELECT 1 FROM change_sets c WHERE c.change_id = d.change_id)
        """,
        {"now": now},
    ))
    # Back in the diff after the directory went back and forth: send it after all, with a fresh round of attempts.
    con.execute(
        "UPDATE change_sets SET status = 'pending', hold_reason = NULL, attempts_at_revival = attempts "
        "WHERE status = 'superseded' AND change_id IN (SELECT change_id FROM _diff)"
    )
    # A change in doubt stays until a newer change of its key replaces it, whatever its status: the application may
    # have applied it, so it is sent again (re-derived from the desired state first) rather than forgotten.
    superseded = first_int(con.execute(
        f"""
        UPDATE change_sets c SET status = 'superseded'
        WHERE {org_scope(org_id, "c.organization_id")}
          AND c.status IN ('pending', 'held', 'failed', 'dead')
          AND NOT EXISTS (SELECT 1 FROM _diff d WHERE d.change_id = c.change_id)
          AND (NOT coalesce(c.in_doubt, false)
               OR EXISTS (SELECT 1 FROM _diff d WHERE d.organization_id = c.organization_id
                          AND d.entity = c.entity AND d.entity_key = c.entity_key))
        """,
        params,
    ))
    # What is dead now is still wanted (the rest was just superseded).
    revived = sum(revive_dead(con, org_id, now).values()) if full else 0

    apply_directory_holds(con, org_id)
    _load_guards(con, guard)
    con.execute(_GUARD_SQL.format(scope=scope, scope_c=org_scope(org_id, "c.organization_id"), hold_guard=HOLD_GUARD),
                params | {"now": now})
    con.execute(_HOLD_SQL.format(hold_guard=HOLD_GUARD))
    con.execute(
        f"""
        UPDATE change_sets c
        SET status = CASE WHEN c.status = 'pending' THEN 'held' ELSE 'pending' END,
            hold_reason = CASE WHEN c.status = 'pending' THEN '{HOLD_GUARD}' END
        WHERE c.change_id IN (SELECT change_id FROM _diff)
          AND ((c.status = 'pending' AND c.change_id IN (SELECT change_id FROM _hold))
               OR (c.status = 'held' AND c.hold_reason = '{HOLD_GUARD}'
                   AND c.change_id NOT IN (SELECT change_id FROM _hold)))
        """
    )

    counts: dict[str, Any] = {
        f"{entity}.{op}": n
        for entity, op, n in con.execute("SELECT entity, op, count(*) FROM _diff GROUP BY ALL ORDER BY ALL").fetchall()
    }
    counts["total"] = sum(v for v in counts.values())
    counts["inserted"] = inserted
    counts["superseded"] = superseded
    counts["revived"] = revived
    counts["held"] = first_int(con.execute(
        "SELECT count(*) FROM change_sets WHERE status = 'held' AND change_id IN (SELECT change_id FROM _diff)"
    ))
    counts["guard_tripped"] = [r[0] for r in con.execute(
        "SELECT organization_id FROM _guard WHERE tripped ORDER BY 1").fetchall()]
    return counts


def guard_status(con: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    """The guard's figures per organization from the last ``compute_change_sets`` on this connection."""
    return con.execute("SELECT * FROM _guard ORDER BY organization_id").df().to_dict("records")


def approve(con: duckdb.DuckDBPyConnection, org_id: str, now: datetime) -> int:
    """Release the organization's changes held by the guard to pending and record the approval (changes created up
    to ``now`` are approved: the guard no longer counts or holds them). Changes held for a disabled directory stay
    held: only enabling the directory releases them. Returns the number released."""
    released = first_int(con.execute(
        "UPDATE change_sets SET status = 'pending', hold_reason = NULL "
        "WHERE organization_id = $org AND status = 'held' AND hold_reason = $reason",
        {"org": org_id, "reason": HOLD_GUARD},
    ))
    con.execute(
        """
        INSERT INTO organization_settings (organization_id, approved_at) VALUES ($org, $now)
        ON CONFLICT (organization_id) DO UPDATE SET approved_at = excluded.approved_at
        """,
        {"org": org_id, "now": now},
    )
    return released
