"""The ledger's way out: which changes are ready to send, and what the application answered. Plain functions over
a DuckDB connection; the caller owns the transaction.

A change the application applied is ``delivered`` and applied to ``delivered_*`` — the delivered state changes only
here, from acknowledgements. A change the application rejects is ``failed`` with ``last_error = 'rejected: ...'``
and retried on the backoff (a rejection is often an ordering effect, e.g. a membership of a user whose create
failed), ``dead`` after ``max_attempts``. A batch that got no answer leaves its changes ``failed`` and ``in_doubt``:
the application may have applied them (see ``change_sets``).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Iterable, Mapping

import duckdb

from scim_pipeline.provisioning.ordering import RANK_SQL
from scim_pipeline.warehouse.sql import first_int

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
        ORDER BY {RANK_SQL}, created_at, entity_key
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
