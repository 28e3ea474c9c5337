"""Scalekit webhook events applied to the warehouse (the incremental path).

Per entity only the newest event counts, and only if it is newer than what the warehouse already has: a row's
version is the ``occurred_at`` of the last event applied to it, else the directory's own ``updated_at`` (or, for a
tombstone learned from a snapshot, the listing's time). So duplicates, replays and reordering are harmless, and a
late ``user_updated`` never brings back a deleted user. Every event gets a ``webhook_events`` row with its outcome.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone

import duckdb

from scim_pipeline.scalekit import ids

USER_EVENTS = {
    "organization.directory.user_created", "organization.directory.user_updated", "organization.directory.user_deleted",
}
GROUP_EVENTS = {
    "organization.directory.group_created", "organization.directory.group_updated",
    "organization.directory.group_deleted",
}
DIRECTORY_EVENTS = {"organization.directory_enabled", "organization.directory_disabled"}
KNOWN_EVENTS = USER_EVENTS | GROUP_EVENTS | DIRECTORY_EVENTS


def parse_time(value: str | None) -> datetime | None:
    """RFC 3339 (Scalekit sends up to nanoseconds and a Z) as a naive UTC datetime."""
    if not value:
        return None
    text = value.strip().replace("Z", "+00:00")
    main, _, rest = text.partition(".")
    if rest:  # trim fractional seconds to microseconds, keep the offset
        digits = "".join(ch for ch in rest if ch.isdigit())
        offset = rest[len(digits):]
        text = f"{main}.{digits[:6].ljust(6, '0')}{offset}"
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(timezone.utc).replace(tzinfo=None)
    return parsed


@dataclass
class Event:
    """One inbox entry as the applier needs it."""

    webhook_id: str
    event_id: str | None
    type: str | None
    organization_id: str | None
    occurred_at: datetime | None
    received_at: datetime | None
    data: dict
    seq: int
    reason: str | None = None  # why the event is invalid: it is then recorded, never applied


def event_from_body(webhook_id: str, body: str | dict, seq: int, received_at: datetime | None) -> Event:
    payload = json.loads(body) if isinstance(body, str) else body
    org = payload.get("organization_id")
    return Event(
        webhook_id=webhook_id,
        event_id=payload.get("id"),
        type=payload.get("type"),
        organization_id=org if isinstance(org, str) else None,
        occurred_at=parse_time(payload.get("occurred_at")),
        received_at=received_at,
        data=payload.get("data") if isinstance(payload.get("data"), dict) else {},
        seq=seq,
        reason=None if ids.ORGANIZATION.matches(org) else f"organization_id: {_why(ids.ORGANIZATION, org)}",
    )


def event_from_inbox(item) -> Event:
    """An inbox entry (its ``webhook_id``, ``body``, ``seq`` and ``received_at``) as an event to apply; one that
    cannot be read is an invalid event, recorded with the reason."""
    received_at = parse_time(item.received_at)
    try:
        return event_from_body(item.webhook_id, item.body, item.seq, received_at)
    except (ValueError, TypeError, AttributeError) as exc:
        return Event(item.webhook_id, None, None, None, None, received_at, {}, item.seq,
                     reason=f"unreadable: {type(exc).__name__}: {exc}"[:300])


def _why(kind: ids.IdKind, value) -> str:
    try:
        kind.check(value)
    except ids.InvalidId as exc:
        return str(exc)
    return ""


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
            received_at TIMESTAMP, seq BIGINT, entity_id VARCHAR, data JSON)
        """
    )
    rows = [
        (e.webhook_id, e.event_id, e.type, e.organization_id, e.occurred_at, e.received_at, e.seq,
         e.data.get("id"), json.dumps(e.data))
        for e in events
    ]
    if rows:
        con.executemany("INSERT INTO stage_events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)

    # Outcomes first, from the state before applying: duplicate, ignored, invalid, stale, applied.
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE event_outcomes AS
        WITH fresh AS (
            SELECT s.*, row_number() OVER (PARTITION BY coalesce(s.event_id, s.webhook_id) ORDER BY s.seq) AS copy
            FROM stage_events s
            WHERE s.webhook_id NOT IN (SELECT webhook_id FROM webhook_events)
              AND (s.event_id IS NULL OR s.event_id NOT IN (SELECT event_id FROM webhook_events WHERE event_id IS NOT NULL))
        ),
        ranked AS (
            SELECT f.*, row_number() OVER (PARTITION BY f.type IN ({_sql_list(USER_EVENTS)}),
                       f.type IN ({_sql_list(GROUP_EVENTS)}), f.entity_id ORDER BY f.occurred_at DESC, f.seq DESC) AS rank
            FROM fresh f WHERE f.copy = 1
        ),
        versioned AS (
            SELECT r.*,
                   CASE WHEN r.type IN ({_sql_list(USER_EVENTS)}) THEN (SELECT coalesce(u.event_at, u.updated_at)
                            FROM directory_users u WHERE u.user_id = r.entity_id)
                        WHEN r.type IN ({_sql_list(GROUP_EVENTS)}) THEN (SELECT coalesce(g.event_at, g.updated_at)
                            FROM directory_groups g WHERE g.group_id = r.entity_id)
                   END AS version
            FROM ranked r
        )
        SELECT webhook_id, event_id, type, organization_id, occurred_at, received_at, seq, entity_id, data,
               CASE WHEN type IS NULL OR type NOT IN ({_sql_list(KNOWN_EVENTS)}) THEN 'ignored'
                    WHEN entity_id IS NULL OR occurred_at IS NULL OR organization_id IS NULL THEN 'invalid'
                    WHEN rank > 1 THEN 'superseded'
                    WHEN version IS NOT NULL AND occurred_at <= version THEN 'stale'
                    ELSE 'applied' END AS outcome
        FROM versioned
        """
    )
    apply = "SELECT * FROM event_outcomes WHERE outcome = 'applied'"
    user_upserts = f"{apply} AND type <> 'organization.directory.user_deleted' AND type IN ({_sql_list(USER_EVENTS)})"

    con.execute(
        f"""
        INSERT INTO directory_users AS t (user_id, organization_id, directory_id, email, given_name, family_name,
            preferred_username, active, emails, updated_at, detail, deleted_at, synced_at, event_at)
        SELECT e.entity_id, e.organization_id,
               coalesce(e.data ->> 'directory_id',
                        (SELECT min(directory_id) FROM directories d WHERE d.organization_id = e.organization_id)),
               e.data ->> 'email', e.data ->> 'given_name', e.data ->> 'family_name',
               e.data ->> 'preferred_username', coalesce((e.data ->> 'active')::BOOLEAN, true),
               coalesce(e.data -> 'emails', to_json([e.data ->> 'email'])), e.occurred_at, e.data, NULL, NULL,
               e.occurred_at
        FROM ({user_upserts}) e
        ON CONFLICT (user_id) DO UPDATE SET
            email = excluded.email, given_name = excluded.given_name, family_name = excluded.family_name,
            preferred_username = excluded.preferred_username, active = excluded.active, emails = excluded.emails,
            updated_at = excluded.updated_at, detail = excluded.detail, deleted_at = NULL,
            event_at = excluded.event_at
        """
    )
    # A user event carries the user's groups: its raw memberships become exactly those.
    con.execute(f"DELETE FROM directory_user_groups WHERE user_id IN (SELECT entity_id FROM ({apply}) e WHERE type IN ({_sql_list(USER_EVENTS)}))")
    con.execute(
        f"""
        INSERT OR IGNORE INTO directory_user_groups (organization_id, user_id, group_id)
        SELECT e.organization_id, e.entity_id, g.value ->> 'id'
        FROM ({user_upserts}) e, json_each(coalesce(e.data -> 'groups', '[]'::JSON)) AS g
        WHERE g.value ->> 'id' IS NOT NULL
        """
    )
    con.execute(
        f"""
        UPDATE directory_users AS t SET deleted_at = e.occurred_at, event_at = e.occurred_at
        FROM ({apply} AND type = 'organization.directory.user_deleted') e WHERE t.user_id = e.entity_id
        """
    )
    con.execute(
        f"""
        INSERT INTO directory_groups AS t (group_id, organization_id, directory_id, display_name, updated_at, detail,
            deleted_at, synced_at, event_at)
        SELECT e.entity_id, e.organization_id, e.data ->> 'directory_id', e.data ->> 'display_name', e.occurred_at,
               e.data, CASE WHEN e.type = 'organization.directory.group_deleted' THEN e.occurred_at END, NULL,
               e.occurred_at
        FROM ({apply} AND type IN ({_sql_list(GROUP_EVENTS)})) e
        ON CONFLICT (group_id) DO UPDATE SET
            display_name = coalesce(excluded.display_name, t.display_name), updated_at = excluded.updated_at,
            detail = excluded.detail, deleted_at = excluded.deleted_at, event_at = excluded.event_at
        """
    )
    con.execute(
        f"""
        UPDATE directories AS d SET enabled = (e.type = 'organization.directory_enabled')
        FROM ({apply} AND type IN ({_sql_list(DIRECTORY_EVENTS)})) e WHERE d.directory_id = e.entity_id
        """
    )
    con.execute(
        """
        INSERT OR IGNORE INTO webhook_events (event_id, webhook_id, type, organization_id, occurred_at, received_at,
            applied_at, outcome, inbox_seq)
        SELECT event_id, webhook_id, type, organization_id, occurred_at, received_at, $applied_at, outcome, seq
        FROM event_outcomes
        """,
        {"applied_at": applied_at},
    )
    counts = dict(con.execute("SELECT outcome, count(*) FROM event_outcomes GROUP BY ALL").fetchall())
    counts["duplicate"] = len(events) - sum(counts.values())
    recorded = _record_invalid(con, invalid, applied_at)
    counts["invalid"] = counts.get("invalid", 0) + recorded
    counts["duplicate"] += len(invalid) - recorded
    con.execute("DROP TABLE event_outcomes")
    con.execute("DROP TABLE stage_events")
    return counts


def _sql_list(values: set[str]) -> str:
    return ", ".join(f"'{v}'" for v in sorted(values))
