"""Scalekit webhook events applied to the warehouse (the incremental path).

Per entity (user, group, directory) only the newest event counts, and only if it is newer than what the warehouse
already has: a row's version is the ``occurred_at`` of the last event applied to it, else the directory's own
``updated_at`` (or the time a listing began: a tombstone learned from a snapshot, a directory's catalogue entry).
Times are compared to the nanosecond (Scalekit's precision; ``event_nanos`` holds what a TIMESTAMP cannot). At the
same instant a delete wins, then the later arrival in the inbox (``event_seq``). So duplicates, replays and
reordering are harmless, and a late ``user_updated`` never brings back a deleted user. Every event gets a
``webhook_events`` row with its outcome.

Each event stands alone: one that fails its checks (``webhook_envelope``), or names an entity of another
organization, is recorded ``invalid`` with the reason, and its neighbours are applied all the same.
"""

from __future__ import annotations

import json
from datetime import datetime

import duckdb

from scim_pipeline.warehouse.webhook_envelope import (
    DIRECTORY_EVENTS,
    GROUP_EVENTS,
    KNOWN_EVENTS,
    USER_EVENTS,
    Event,
    event_from_body,
    event_from_inbox,
    parse_time,
)

# Reading and checking one event lives in webhook_envelope; these names are this module's too.
__all__ = ["Event", "apply_events", "applied_marks", "event_from_body", "event_from_inbox", "parse_time",
           "record_applied", "unplaced_organizations"]

QUARANTINE = "quarantine"  # the route of the events that name no organization (never an organization id)


def applied_marks(con: duckdb.DuckDBPyConnection, routes: list[str]) -> dict[str, int]:
    """How far each route's inbox events are applied (0 when nothing is yet)."""
    found = dict(con.execute("SELECT route, applied_seq FROM webhook_progress WHERE list_contains($r, route)",
                             {"r": routes}).fetchall())
    return {route: found.get(route, 0) for route in routes}


def record_applied(con: duckdb.DuckDBPyConnection, marks: dict[str, int], applied_at: datetime) -> None:
    """Move each route's mark up to its seq (never back); in the transaction that applied the events."""
    for route, seq in marks.items():
        con.execute(
            """
            INSERT INTO webhook_progress VALUES ($route, $seq, $at)
            ON CONFLICT (route) DO UPDATE SET applied_seq = greatest(applied_seq, excluded.applied_seq),
                applied_at = excluded.applied_at
            """,
            {"route": route, "seq": seq, "at": applied_at},
        )


def _record_invalid(con: duckdb.DuckDBPyConnection, events: list[Event], applied_at: datetime) -> int:
    """Record invalid events (outcome ``invalid``, with the reason); returns how many were new."""
    rows = [(e.event_id, e.webhook_id, e.type, e.organization_id, e.occurred_at, e.received_at, applied_at,
             e.seq, e.reason) for e in events]
    if not rows:
        return 0
    before = con.execute("SELECT count(*) FROM webhook_events").fetchone()[0]
    con.executemany(
        """
        INSERT OR IGNORE INTO webhook_events (event_id, webhook_id, type, organization_id, occurred_at, received_at,
            applied_at, outcome, inbox_seq, reason)
        VALUES (?, ?, ?, ?, ?, ?, ?, 'invalid', ?, ?)
        """,
        rows,
    )
    return con.execute("SELECT count(*) FROM webhook_events").fetchone()[0] - before


def apply_events(con: duckdb.DuckDBPyConnection, events: list[Event], applied_at: datetime) -> dict[str, int]:
    """Apply events in one set-based pass; returns counts per outcome. Call inside a transaction."""
    invalid = [e for e in events if e.reason is not None]
    events = [e for e in events if e.reason is None]
    con.execute(
        """
        CREATE OR REPLACE TEMP TABLE stage_events (
            webhook_id VARCHAR, event_id VARCHAR, type VARCHAR, organization_id VARCHAR, occurred_at TIMESTAMP,
            nanos SMALLINT, is_delete BOOLEAN, received_at TIMESTAMP, seq BIGINT, entity_id VARCHAR, data JSON)
        """
    )
    rows = [
        (e.webhook_id, e.event_id, e.type, e.organization_id, e.occurred_at, e.nanos, e.is_delete, e.received_at,
         e.seq, e.entity_id, json.dumps(e.data))
        for e in events
    ]
    if rows:
        con.executemany("INSERT INTO stage_events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)

    # Outcomes first, from the state before applying: duplicate, ignored, invalid, superseded, stale, applied.
    users, groups = _sql_list(USER_EVENTS), _sql_list(GROUP_EVENTS)
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE event_outcomes AS
        WITH fresh AS (
            SELECT s.*, row_number() OVER (PARTITION BY coalesce(s.event_id, s.webhook_id) ORDER BY s.seq) AS copy
            FROM stage_events s
            WHERE s.webhook_id NOT IN (SELECT webhook_id FROM webhook_events)
              AND (s.event_id IS NULL OR s.event_id NOT IN (
                   SELECT event_id FROM webhook_events WHERE event_id IS NOT NULL AND outcome <> 'invalid'))
        ),
        -- What the warehouse holds of each entity the events name (ids of users, groups and directories have
        -- distinct prefixes, so one lookup serves all three): its organization and its version.
        entities AS (
            SELECT user_id AS id, organization_id AS owner, coalesce(event_at, updated_at) AS version_at,
                   coalesce(event_nanos, 0) AS version_nanos, event_seq AS version_seq,
                   deleted_at IS NOT NULL AS version_deleted
            FROM directory_users WHERE user_id IN (SELECT entity_id FROM fresh)
            UNION ALL
            SELECT group_id, organization_id, coalesce(event_at, updated_at), coalesce(event_nanos, 0), event_seq,
                   deleted_at IS NOT NULL
            FROM directory_groups WHERE group_id IN (SELECT entity_id FROM fresh)
            UNION ALL
            SELECT directory_id, organization_id, event_at, coalesce(event_nanos, 0), event_seq, false
            FROM directories WHERE directory_id IN (SELECT entity_id FROM fresh)
        ),
        ranked AS (
            SELECT f.*, x.version_at, x.version_nanos, x.version_seq, x.version_deleted,
                   -- another organization's event never changes an entity
                   coalesce(x.owner <> f.organization_id, false) AS foreign_entity,
                   row_number() OVER (PARTITION BY f.type IN ({users}), f.type IN ({groups}), f.entity_id,
                                      foreign_entity
                                      ORDER BY f.occurred_at DESC, f.nanos DESC, f.is_delete DESC, f.seq DESC) AS rank
            FROM fresh f LEFT JOIN entities x ON x.id = f.entity_id
            WHERE f.copy = 1
        )
        SELECT webhook_id, event_id, type, organization_id, occurred_at, received_at, seq, entity_id, data, nanos,
               CASE WHEN type NOT IN ({_sql_list(KNOWN_EVENTS)}) THEN 'ignored'
                    WHEN foreign_entity THEN 'invalid'
                    WHEN rank > 1 THEN 'superseded'
                    WHEN version_at IS NULL OR (occurred_at, nanos) > (version_at, version_nanos) THEN 'applied'
                    -- the same instant: a delete wins, then the later arrival (a listing's version has none)
                    WHEN (occurred_at, nanos) = (version_at, version_nanos)
                         AND ((is_delete AND NOT version_deleted)
                              OR (is_delete = version_deleted AND seq > version_seq)) THEN 'applied'
                    ELSE 'stale' END AS outcome,
               CASE WHEN type IN ({_sql_list(KNOWN_EVENTS)}) AND foreign_entity
                    THEN 'data.id: ' || entity_id || ' belongs to another organization' END AS reason
        FROM ranked
        """
    )
    apply = "SELECT * FROM event_outcomes WHERE outcome = 'applied'"
    user_upserts = f"{apply} AND type <> 'organization.directory.user_deleted' AND type IN ({_sql_list(USER_EVENTS)})"

    # Scalekit's user events carry no directory_id and no emails list (only the primary email), and nothing marks
    # their groups required: what an event leaves out is taken from what the warehouse knows (_known_users), never
    # guessed into a change.
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE _known_users AS
        SELECT e.entity_id AS user_id,
               coalesce(e.data ->> 'directory_id', u.directory_id, {_DIRECTORY_OF_GROUPS}, {_ONLY_ENABLED_DIRECTORY})
                   AS directory_id,
               CASE WHEN (e.data -> 'emails') IS NOT NULL THEN e.data -> 'emails'
                    WHEN (e.data ->> 'email') IS NULL THEN u.emails
                    -- the primary address first; the other addresses stay, the one it replaced goes
                    ELSE to_json(list_prepend(e.data ->> 'email',
                         list_filter(coalesce((u.emails ->> '$[*]')[2:], []), lambda x: x <> (e.data ->> 'email')))) END
                   AS emails
        FROM (SELECT * FROM event_outcomes WHERE outcome = 'applied' AND type IN ({_sql_list(USER_EVENTS)})) e
        LEFT JOIN directory_users u ON u.user_id = e.entity_id
        """
    )
    con.execute(
        f"""
        INSERT INTO directory_users AS t (user_id, organization_id, directory_id, email, given_name, family_name,
            preferred_username, active, emails, updated_at, detail, deleted_at, synced_at, event_at, event_nanos,
            event_seq)
        SELECT e.entity_id, e.organization_id, k.directory_id,
               e.data ->> 'email', e.data ->> 'given_name', e.data ->> 'family_name',
               e.data ->> 'preferred_username', coalesce((e.data ->> 'active')::BOOLEAN, true),
               k.emails, e.occurred_at, e.data, NULL, NULL, e.occurred_at, e.nanos, e.seq
        FROM ({user_upserts}) e JOIN _known_users k ON k.user_id = e.entity_id
        ON CONFLICT (user_id) DO UPDATE SET
            directory_id = excluded.directory_id,
            email = excluded.email, given_name = excluded.given_name, family_name = excluded.family_name,
            preferred_username = excluded.preferred_username, active = excluded.active, emails = excluded.emails,
            updated_at = excluded.updated_at, detail = excluded.detail, deleted_at = NULL,
            event_at = excluded.event_at, event_nanos = excluded.event_nanos, event_seq = excluded.event_seq
        """
    )
    # A user event that lists the user's groups makes its raw memberships exactly those; one without a ``groups``
    # key leaves them as they are. A deleted user has none.
    con.execute(
        f"""
        DELETE FROM directory_user_groups WHERE user_id IN (
            SELECT entity_id FROM ({apply}) e WHERE type IN ({_sql_list(USER_EVENTS)})
              AND (type = 'organization.directory.user_deleted' OR (e.data -> 'groups') IS NOT NULL))
        """
    )
    con.execute(
        f"""
        INSERT OR IGNORE INTO directory_user_groups (organization_id, user_id, group_id)
        SELECT e.organization_id, e.entity_id, g.value ->> 'id'
        FROM ({user_upserts}) e, json_each(coalesce(e.data -> 'groups', '[]'::JSON)) AS g
        WHERE g.value ->> 'id' IS NOT NULL
        """
    )
    # A deletion of a user the warehouse has never seen still leaves a tombstone: Scalekit retries a webhook for a
    # day, and a user_created retried after the deletion must find it (stale) rather than bring the user back.
    con.execute(
        f"""
        INSERT INTO directory_users AS t (user_id, organization_id, directory_id, email, active, emails, updated_at,
            detail, deleted_at, synced_at, event_at, event_nanos, event_seq)
        SELECT e.entity_id, e.organization_id, k.directory_id, e.data ->> 'email', false, k.emails, e.occurred_at,
               e.data, e.occurred_at, NULL, e.occurred_at, e.nanos, e.seq
        FROM ({apply} AND type = 'organization.directory.user_deleted') e JOIN _known_users k ON k.user_id = e.entity_id
        ON CONFLICT (user_id) DO UPDATE SET deleted_at = excluded.deleted_at, event_at = excluded.event_at,
            event_nanos = excluded.event_nanos, event_seq = excluded.event_seq
        """
    )
    con.execute(
        f"""
        INSERT INTO directory_groups AS t (group_id, organization_id, directory_id, display_name, updated_at, detail,
            deleted_at, synced_at, event_at, event_nanos, event_seq)
        SELECT e.entity_id, e.organization_id, e.data ->> 'directory_id', e.data ->> 'display_name', e.occurred_at,
               e.data, CASE WHEN e.type = 'organization.directory.group_deleted' THEN e.occurred_at END, NULL,
               e.occurred_at, e.nanos, e.seq
        FROM ({apply} AND type IN ({_sql_list(GROUP_EVENTS)})) e
        ON CONFLICT (group_id) DO UPDATE SET
            display_name = coalesce(excluded.display_name, t.display_name), updated_at = excluded.updated_at,
            detail = excluded.detail, deleted_at = excluded.deleted_at, event_at = excluded.event_at,
            event_nanos = excluded.event_nanos, event_seq = excluded.event_seq
        """
    )
    con.execute(
        f"""
        UPDATE directories AS d SET enabled = (e.type = 'organization.directory_enabled'), event_at = e.occurred_at,
            event_nanos = e.nanos, event_seq = e.seq
        FROM ({apply} AND type IN ({_sql_list(DIRECTORY_EVENTS)})) e WHERE d.directory_id = e.entity_id
        """
    )
    con.execute(
        """
        INSERT OR IGNORE INTO webhook_events (event_id, webhook_id, type, organization_id, occurred_at, received_at,
            applied_at, outcome, inbox_seq, reason)
        SELECT event_id, webhook_id, type, organization_id, occurred_at, received_at, $applied_at, outcome, seq, reason
        FROM event_outcomes
        """,
        {"applied_at": applied_at},
    )
    counts = dict(con.execute("SELECT outcome, count(*) FROM event_outcomes GROUP BY ALL").fetchall())
    counts["duplicate"] = len(events) - sum(counts.values())
    recorded = _record_invalid(con, invalid, applied_at)
    counts["invalid"] = counts.get("invalid", 0) + recorded
    counts["duplicate"] += len(invalid) - recorded
    con.execute("DROP TABLE _known_users")
    con.execute("DROP TABLE event_outcomes")
    con.execute("DROP TABLE stage_events")
    return counts


# Where a user event names no directory and the warehouse has no row of the user: the directory of the groups the
# event lists (when they agree), else the organization's only enabled directory (Scalekit sends no events from a
# disabled one). Else NULL: ``unplaced_organizations`` asks for a full sync of the organization.
_DIRECTORY_OF_GROUPS = """(
    SELECT any_value(g.directory_id) FROM json_each(coalesce(e.data -> 'groups', '[]'::JSON)) j
    JOIN directory_groups g ON g.group_id = j.value ->> 'id' AND g.organization_id = e.organization_id
    HAVING count(DISTINCT g.directory_id) = 1)"""
_ONLY_ENABLED_DIRECTORY = """(
    SELECT any_value(d.directory_id) FROM directories d
    WHERE d.organization_id = e.organization_id AND coalesce(d.enabled, true) HAVING count(*) = 1)"""


def unplaced_organizations(con: duckdb.DuckDBPyConnection, organization_ids: list[str]) -> list[str]:
    """The organizations with a live user whose directory the warehouse does not know: a full sync of each
    places them."""
    return [row[0] for row in con.execute(
        """
        SELECT DISTINCT organization_id FROM directory_users
        WHERE list_contains($orgs, organization_id) AND directory_id IS NULL AND deleted_at IS NULL ORDER BY 1
        """,
        {"orgs": organization_ids},
    ).fetchall()]


def _sql_list(values: set[str]) -> str:
    return ", ".join(f"'{v}'" for v in sorted(values))
