"""The ledger's way out: which changes are ready to send, and what the application answered. Plain functions over
a DuckDB connection; the caller owns the transaction.

A change the application applied is ``delivered`` and applied to ``delivered_*`` — the delivered state changes only
here, from acknowledgements. A change the application rejects is ``failed`` with ``last_error = 'rejected: ...'``
and retried on the backoff (a rejection is often an ordering effect, e.g. a membership of a user whose create
failed), ``dead`` after ``max_attempts`` (``dead_at`` says since when). A batch that got no answer leaves its
changes ``failed``, and ``in_doubt`` when a request carrying them may have been applied (see ``change_sets``).

Dead is not the end: ``revive_dead`` gives a dead change that is still wanted a fresh round of ``max_attempts``
(``attempts`` keeps counting, so every resend is still a new request for the application; ``attempts_at_revival``
marks where the round began). Before an in-doubt change is sent again, ``rederive_in_doubt`` compares it with what
the directory wants for its key now, and replaces it when the directory changed its mind.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Iterable, Mapping

import duckdb

from scim_pipeline.provisioning.ordering import RANK_SQL
from scim_pipeline.warehouse.sql import Organizations, first_int, org_params, org_scope

# Attempts of the current round: since the change was created, or last revived from dead.
_ROUND = "(attempts - coalesce(attempts_at_revival, 0))"


def ready_changes(
    con: duckdb.DuckDBPyConnection, org_id: Organizations, now: datetime, max_attempts: int, limit: int | None = None
) -> list[dict[str, Any]]:
    """Changes of these organizations (one, a list, or None: all) to send now, by organization in delivery order:
    pending ones, and failed ones whose backoff has passed (held, dead,
    superseded and delivered ones never). Each is ``{"change_id", "organization_id", "entity", "op", "key", "data",
    "attempts"}`` where ``data`` is the parsed payload, ready for the application's ``changes`` list."""
    rows = con.execute(
        f"""
        SELECT change_id, organization_id, entity, op, entity_key, payload, attempts
        FROM change_sets
        WHERE {org_scope(org_id)} AND {_ROUND} < $max_attempts
          AND (status = 'pending' OR (status = 'failed' AND coalesce(next_attempt_at, created_at) <= $now))
        ORDER BY organization_id, {RANK_SQL}, created_at, entity_key
        {"LIMIT $limit" if limit is not None else ""}
        """,
        org_params(org_id, now=now, max_attempts=max_attempts) | ({"limit": limit} if limit is not None else {}),
    ).fetchall()
    return [
        {"change_id": c, "organization_id": o, "entity": e, "op": op, "key": k, "data": json.loads(p), "attempts": a}
        for c, o, e, op, k, p, a in rows
    ]


def _backoff_sql(base_s: float, cap_s: float) -> str:
    """Next attempt: exponential in the attempts made so far in this round, capped, with jitter in [50%, 100%]."""
    return (f"$now + to_microseconds(CAST(least({cap_s}, {base_s} * pow(2, {_ROUND})) "
            f"* (0.5 + random() / 2) * 1e6 AS BIGINT))")


def _dead_sql(value: str) -> str:
    """``value`` when this attempt spends the round's last one, else NULL (a CASE over one ledger row)."""
    return f"CASE WHEN {_ROUND} + 1 >= $max_attempts THEN {value} END"


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
            SELECT c.change_id, c.organization_id, c.entity, c.op, c.payload, c.created_at, c.replaces, r.applied,
                   r.error
            FROM (SELECT * FROM _results_in QUALIFY row_number() OVER (PARTITION BY change_id) = 1) r
            JOIN change_sets c ON c.change_id = r.change_id
            WHERE c.status <> 'delivered'
            """
        )
    finally:
        con.unregister("_results_in")
    _apply_to_delivered(con)
    applied = first_int(con.execute(
        """
        UPDATE change_sets c
        SET status = 'delivered', delivered_at = $now, attempts = c.attempts + 1, last_error = NULL,
            next_attempt_at = NULL, in_doubt = false
        FROM _results r WHERE r.change_id = c.change_id AND r.applied
        """,
        {"now": now},
    ))
    rejected = first_int(con.execute(
        f"""
        UPDATE change_sets c
        SET attempts = c.attempts + 1,
            status = coalesce({_dead_sql("'dead'")}, 'failed'),
            dead_at = {_dead_sql("$now")},
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
    # A user created again in place of a deletion in doubt: the application may have deleted the user with their
    # memberships and roles, so those are no longer taken as delivered, and the next diff sends them again.
    for table in ("delivered_memberships", "delivered_roles"):
        con.execute(
            f"""
            DELETE FROM {table} t USING _results r
            WHERE r.applied AND r.entity = 'user' AND r.op = 'create' AND r.replaces IS NOT NULL
              AND t.organization_id = r.organization_id AND t.user_id = r.payload->>'user_id'
            """
        )
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
    *,
    in_doubt: bool = True,
    retry_at: datetime | None = None,
    attempted: bool = True,
) -> dict[str, int]:
    """A batch that got no answer (429, 5xx, timeout, connection error after the delivery's own retries): each
    change becomes ``failed`` with attempts+1 and ``next_attempt_at = now + min(cap, backoff * 2^attempts)`` with
    jitter (or ``retry_at``, when the application named a time), or ``dead`` once the round's ``max_attempts`` are
    used. ``in_doubt``: a request carrying them may have been applied (see the module's notes); a change already in
    doubt stays so. ``attempted=False``: the changes were never sent (an earlier batch was not delivered): they wait
    until ``retry_at`` without spending an attempt, and what is known of them does not change.
    Returns ``{"failed", "dead"}``."""
    ids = list(dict.fromkeys(str(c) for c in change_ids))
    if not ids:
        return {"failed": 0, "dead": 0}
    if not attempted:
        if retry_at is None:
            raise ValueError("changes never sent need the time to try them again (retry_at)")
        rows = con.execute(
            """
            UPDATE change_sets SET status = 'failed', last_error = $error, next_attempt_at = $retry_at
            WHERE change_id IN (SELECT unnest($ids)) AND status IN ('pending', 'failed')
            RETURNING status
            """,
            {"ids": ids, "error": error, "retry_at": retry_at},
        ).fetchall()
        return {"failed": len(rows), "dead": 0}
    rows = con.execute(
        f"""
        UPDATE change_sets
        SET attempts = attempts + 1,
            status = coalesce({_dead_sql("'dead'")}, 'failed'),
            dead_at = {_dead_sql("$now")},
            last_error = $error,
            next_attempt_at = coalesce($retry_at, {_backoff_sql(backoff_s, backoff_cap_s)}),
            in_doubt = in_doubt OR $in_doubt
        WHERE change_id IN (SELECT unnest($ids)) AND status <> 'delivered'
        RETURNING status
        """,
        {"ids": ids, "error": error, "now": now, "max_attempts": max_attempts, "in_doubt": in_doubt,
         "retry_at": retry_at},
    ).fetchall()
    dead = sum(1 for (s,) in rows if s == "dead")
    return {"failed": len(rows) - dead, "dead": dead}


def revive_dead(
    con: duckdb.DuckDBPyConnection,
    org_id: Organizations,
    now: datetime,
    *,
    died_before: datetime | None = None,
    delivered_since: bool = False,
) -> dict[str, int]:
    """Give the dead changes of these organizations (one, a list, or None: all) a fresh round of attempts: they are
    ``pending`` again. A change is dead only while ``compute_change_sets`` keeps it (a change no longer wanted is
    superseded), so every dead change is still wanted. ``died_before``: only those dead since then (a cool-down);
    ``delivered_since``: only if the application has applied a change of their organization since they died (it is
    answering again). Returns ``{organization_id: revived}``."""
    where = [org_scope(org_id, "c.organization_id"), "c.status = 'dead'"]
    params = org_params(org_id)
    if died_before is not None:
        where.append("coalesce(c.dead_at, c.created_at) <= $died_before")
        params["died_before"] = died_before
    if delivered_since:
        where.append("""coalesce(c.dead_at, c.created_at) < (SELECT max(x.delivered_at) FROM change_sets x
                                                            WHERE x.organization_id = c.organization_id)""")
    rows = con.execute(
        f"""
        UPDATE change_sets c
        SET status = 'pending', attempts_at_revival = c.attempts, dead_at = NULL, next_attempt_at = NULL
        WHERE {" AND ".join(where)}
        RETURNING c.organization_id
        """,
        params,
    ).fetchall()
    revived: dict[str, int] = {}
    for (org,) in rows:
        revived[org] = revived.get(org, 0) + 1
    return dict(sorted(revived.items()))


# An in-doubt change of one organization beside what the directory wants for its key now: the wanted op and
# payload (built as the diff builds them) and whether the in-doubt change already is that. The in-doubt change's
# outcome is taken as applied (the worst case), so the op moves the application from there: a deactivation since
# undone becomes a reactivation of the user's current record, a deletion since undone a create.
_REDERIVE_SQL = """
CREATE OR REPLACE TEMP TABLE _rederived AS
WITH doubtful AS (
    SELECT c.change_id, c.organization_id, c.entity, c.op, c.entity_key, c.payload
    FROM change_sets c
    WHERE {scope} AND c.in_doubt AND c.status IN ('pending', 'failed')
),
wanted AS (
    SELECT c.*,
           u.user_id IS NOT NULL AS user_present,
           json_object('user_id', u.user_id, 'email', u.email, 'given_name', u.given_name,
                       'family_name', u.family_name, 'preferred_username', u.preferred_username,
                       'active', u.active) AS user_record,
           u.active AS user_active,
           coalesce(c.op <> 'delete'
                    AND u.email IS NOT DISTINCT FROM c.payload ->> 'email'
                    AND u.given_name IS NOT DISTINCT FROM c.payload ->> 'given_name'
                    AND u.family_name IS NOT DISTINCT FROM c.payload ->> 'family_name'
                    AND u.preferred_username IS NOT DISTINCT FROM c.payload ->> 'preferred_username'
                    AND u.active IS NOT DISTINCT FROM CAST(c.payload ->> 'active' AS BOOLEAN), false) AS user_same,
           m.user_id IS NOT NULL AS membership_present, m.group_name,
           r.user_id IS NOT NULL AS role_present
    FROM doubtful c
    LEFT JOIN desired_users u
      ON c.entity = 'user' AND u.organization_id = c.organization_id AND u.user_id = c.entity_key
    LEFT JOIN desired_memberships m
      ON c.entity = 'membership' AND m.organization_id = c.organization_id
     AND m.group_id = c.payload ->> 'group_id' AND m.user_id = c.payload ->> 'user_id'
    LEFT JOIN desired_roles r
      ON c.entity = 'role' AND r.organization_id = c.organization_id
     AND r.user_id = c.payload ->> 'user_id' AND r.role_name = c.payload ->> 'role_name'
),
derived AS (
    SELECT change_id, organization_id, entity, entity_key, payload,
           CASE entity
               WHEN 'user' THEN CASE WHEN NOT user_present THEN op = 'delete' ELSE user_same END
               WHEN 'membership' THEN (op = 'add') = membership_present
               WHEN 'role' THEN (op = 'grant') = role_present
               ELSE true
           END AS same,
           CASE entity
               WHEN 'user' THEN CASE WHEN NOT user_present THEN 'delete'
                                     WHEN op = 'delete' THEN 'create'
                                     WHEN user_active IS DISTINCT FROM CAST(payload ->> 'active' AS BOOLEAN)
                                         THEN CASE WHEN user_active THEN 'reactivate' ELSE 'deactivate' END
                                     ELSE 'update' END
               WHEN 'membership' THEN CASE WHEN membership_present THEN 'add' ELSE 'remove' END
               WHEN 'role' THEN CASE WHEN role_present THEN 'grant' ELSE 'revoke' END
           END AS new_op,
           CASE entity
               WHEN 'user' THEN CASE WHEN user_present THEN user_record
                                     ELSE json_object('user_id', entity_key) END
               WHEN 'membership' THEN json_object('group_id', payload ->> 'group_id', 'user_id', payload ->> 'user_id',
                                                  'group_name', coalesce(group_name, payload ->> 'group_name'))
               ELSE payload
           END AS new_payload
    FROM wanted
)
SELECT *, 'chg_' || md5(concat_ws(chr(31), organization_id, entity, new_op, entity_key, new_payload::VARCHAR,
                                  'replaces', change_id)) AS new_change_id
FROM derived
"""


def rederive_in_doubt(con: duckdb.DuckDBPyConnection, org_id: Organizations, now: datetime) -> dict[str, Any]:
    """Before these organizations' (one, a list, or None: all) in-doubt changes are sent again, compare each with
    the desired state of its key now. One the directory still wants is sent as it is (the application applies a
    change_id once). One the directory changed its mind about is ``superseded``, never sent again, and replaced by a
    new pending change (``replaces``) that moves the application from the in-doubt outcome to what the directory
    wants now; the replacement is in doubt too (the application's state of the key is still unknown) until it is
    answered.
    Returns ``{"kept", "replaced", "replaced_by_organization"}``."""
    con.execute(_REDERIVE_SQL.replace("{scope}", org_scope(org_id, "c.organization_id")), org_params(org_id))
    con.execute(
        """
        INSERT INTO change_sets (change_id, organization_id, entity, op, entity_key, payload, status, attempts,
                                 created_at, in_doubt, replaces)
        SELECT new_change_id, organization_id, entity, new_op, entity_key, new_payload, 'pending', 0, $now, true,
               change_id
        FROM _rederived WHERE NOT same
        ON CONFLICT (change_id) DO NOTHING
        """,
        {"now": now},
    )
    # A replacement made once before and since superseded is wanted again.
    con.execute(
        """
        UPDATE change_sets SET status = 'pending', attempts_at_revival = attempts
        WHERE status = 'superseded' AND change_id IN (SELECT new_change_id FROM _rederived WHERE NOT same)
        """
    )
    replaced: dict[str, int] = {}
    for (org,) in con.execute(
        "UPDATE change_sets SET status = 'superseded' "
        "WHERE change_id IN (SELECT change_id FROM _rederived WHERE NOT same) RETURNING organization_id"
    ).fetchall():
        replaced[org] = replaced.get(org, 0) + 1
    kept = first_int(con.execute("SELECT count(*) FROM _rederived WHERE same"))
    return {"kept": kept, "replaced": sum(replaced.values()), "replaced_by_organization": replaced}
