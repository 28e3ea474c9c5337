"""Tables of the warehouse (docs/warehouse.md). All timestamps are UTC ``TIMESTAMP``s.

Directory tables hold what Scalekit says, tombstoned rather than deleted. Derived tables (memberships, roles, desired
state) hold current facts for live users. ``delivered_*`` tables hold what the application has acknowledged: the
other side of every diff. ``change_sets`` is the ledger (an outbox) of changes sent or to send.
"""

from __future__ import annotations

import duckdb

# Version 2 added the columns of ADDED_COLUMNS and the table webhook_progress (webhook ordering and progress),
# change_sets.hold_reason, dead_at, attempts_at_revival and replaces, and
# organization_settings.deprovision_window_hours; ``create_all`` brings an older file up to date.
# Version 3 added the table scim_ids (a new table needs no upgrade statement: ``create_all`` creates it).
SCHEMA_VERSION = 3

TABLES: dict[str, str] = {
    "organizations": """
        organization_id VARCHAR PRIMARY KEY,
        display_name VARCHAR,
        external_id VARCHAR,
        synced_at TIMESTAMP
    """,
    "directories": """
        directory_id VARCHAR PRIMARY KEY,
        organization_id VARCHAR NOT NULL,
        name VARCHAR,
        provider VARCHAR,
        directory_type VARCHAR,
        enabled BOOLEAN,
        role_assignments JSON,
        total_users INTEGER,
        total_groups INTEGER,
        synced_at TIMESTAMP
    """,
    "directory_users": """
        user_id VARCHAR PRIMARY KEY,
        organization_id VARCHAR NOT NULL,
        directory_id VARCHAR,
        email VARCHAR,
        given_name VARCHAR,
        family_name VARCHAR,
        preferred_username VARCHAR,
        active BOOLEAN,
        emails JSON,
        updated_at TIMESTAMP,
        detail JSON,
        deleted_at TIMESTAMP,
        synced_at TIMESTAMP,
        -- occurred_at of the newest webhook event applied to this row: older events never undo it
        event_at TIMESTAMP
    """,
    "directory_groups": """
        group_id VARCHAR PRIMARY KEY,
        organization_id VARCHAR NOT NULL,
        directory_id VARCHAR,
        display_name VARCHAR,
        updated_at TIMESTAMP,
        detail JSON,
        deleted_at TIMESTAMP,
        synced_at TIMESTAMP,
        event_at TIMESTAMP
    """,
    # Raw memberships as the directory lists them on each user (live or not); group_memberships is derived.
    "directory_user_groups": """
        organization_id VARCHAR NOT NULL,
        user_id VARCHAR NOT NULL,
        group_id VARCHAR NOT NULL,
        PRIMARY KEY (user_id, group_id)
    """,
    "group_memberships": """
        organization_id VARCHAR NOT NULL,
        group_id VARCHAR NOT NULL,
        user_id VARCHAR NOT NULL,
        group_name VARCHAR,
        PRIMARY KEY (organization_id, group_id, user_id)
    """,
    "role_assignments": """
        organization_id VARCHAR NOT NULL,
        user_id VARCHAR NOT NULL,
        role_name VARCHAR NOT NULL,
        source VARCHAR NOT NULL
    """,
    "directory_users_history": """
        user_id VARCHAR NOT NULL,
        organization_id VARCHAR NOT NULL,
        valid_from TIMESTAMP NOT NULL,
        valid_to TIMESTAMP,
        email VARCHAR,
        given_name VARCHAR,
        family_name VARCHAR,
        preferred_username VARCHAR,
        active BOOLEAN,
        deleted BOOLEAN,
        roles VARCHAR[],
        row_hash VARCHAR
    """,
    # What the application has acknowledged (applied), per organization: the "have" side of the diff.
    "delivered_users": """
        organization_id VARCHAR NOT NULL,
        user_id VARCHAR NOT NULL,
        email VARCHAR,
        given_name VARCHAR,
        family_name VARCHAR,
        preferred_username VARCHAR,
        active BOOLEAN,
        PRIMARY KEY (organization_id, user_id)
    """,
    "delivered_memberships": """
        organization_id VARCHAR NOT NULL,
        group_id VARCHAR NOT NULL,
        user_id VARCHAR NOT NULL,
        -- the group's name as delivered with the add, so that the remove can carry it too
        group_name VARCHAR,
        PRIMARY KEY (organization_id, group_id, user_id)
    """,
    "delivered_roles": """
        organization_id VARCHAR NOT NULL,
        user_id VARCHAR NOT NULL,
        role_name VARCHAR NOT NULL,
        PRIMARY KEY (organization_id, user_id, role_name)
    """,
    # status: pending, delivered, failed, held, dead, and superseded (no longer in the diff: never sent).
    "change_sets": """
        change_id VARCHAR PRIMARY KEY,
        organization_id VARCHAR NOT NULL,
        entity VARCHAR NOT NULL,
        op VARCHAR NOT NULL,
        entity_key VARCHAR NOT NULL,
        payload JSON,
        status VARCHAR NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        last_error VARCHAR,
        created_at TIMESTAMP NOT NULL,
        delivered_at TIMESTAMP,
        next_attempt_at TIMESTAMP,
        batch_id VARCHAR,
        -- the application's state of this key is unknown: this change (or the one it replaces) was sent without an
        -- answer, and the application may have applied it (only a newer change of its key replaces it)
        in_doubt BOOLEAN NOT NULL DEFAULT false,
        -- why a held change is held: 'mass deprovisioning guard' (until approved) or 'directory disabled'
        hold_reason VARCHAR,
        -- when it last became dead
        dead_at TIMESTAMP,
        -- attempts already made when it was last revived from dead: it gets max_attempts more after that
        attempts_at_revival INTEGER DEFAULT 0,
        -- the in-doubt change this one re-derived from the desired state at send time (it was never sent again)
        replaces VARCHAR
    """,
    "webhook_events": """
        event_id VARCHAR,
        webhook_id VARCHAR PRIMARY KEY,
        type VARCHAR,
        organization_id VARCHAR,
        occurred_at TIMESTAMP,
        received_at TIMESTAMP,
        applied_at TIMESTAMP,
        outcome VARCHAR,
        inbox_seq BIGINT
    """,
    # How far each applier has applied the webhook inbox: an organization id (its incremental runs), or "quarantine"
    # (events that name no organization). Its events up to applied_seq are applied or recorded in webhook_events.
    "webhook_progress": """
        route VARCHAR PRIMARY KEY,
        applied_seq BIGINT NOT NULL,
        applied_at TIMESTAMP
    """,
    # Per-organization settings people change at run time (the guard's threshold, approvals).
    "organization_settings": """
        organization_id VARCHAR PRIMARY KEY,
        deprovision_threshold DOUBLE,
        approved_at TIMESTAMP,
        deprovision_min_users INTEGER,
        deprovision_window_hours DOUBLE
    """,
    # The SCIM 2.0 protocol only: the id the SCIM service provider gave each resource the pipeline provisioned or
    # adopted there (resource_type 'User': external_id is the directory user id; 'Group': the directory group id),
    # and for a group the displayName the application holds. The groups here are the application's groups: the diff
    # renames and deletes them (change_sets.py).
    "scim_ids": """
        organization_id VARCHAR NOT NULL,
        resource_type VARCHAR NOT NULL,
        external_id VARCHAR NOT NULL,
        scim_id VARCHAR NOT NULL,
        display_name VARCHAR,
        PRIMARY KEY (organization_id, resource_type, external_id)
    """,
    "schema_version": """
        version INTEGER NOT NULL
    """,
}

# Columns added after their table was first released, in order. They are appended to a new table's columns and
# added to an existing file's table when the warehouse is opened for writing, so both have the same column order.
ADDED_COLUMNS: dict[str, dict[str, str]] = {
    # The version a webhook event (or a catalogue listing) gave the row, to the nanosecond: event_at holds the
    # microseconds, event_nanos the nanoseconds beyond them, event_seq the event's inbox seq (ties: the later wins).
    "directories": {"event_at": "TIMESTAMP", "event_nanos": "SMALLINT", "event_seq": "BIGINT"},
    "directory_users": {"event_nanos": "SMALLINT", "event_seq": "BIGINT"},
    "directory_groups": {"event_nanos": "SMALLINT", "event_seq": "BIGINT"},
    # why an event was recorded ``invalid``
    "webhook_events": {"reason": "VARCHAR"},
}

# The application's desired state: what the diff compares with delivered_* (docs/warehouse.md: current facts for live users).
# A user whose directory does not say whether they are active counts as active (SCIM's usual reading).
VIEWS: dict[str, str] = {
    "desired_users": """
        SELECT organization_id, user_id, email, given_name, family_name, preferred_username,
               coalesce(active, true) AS active
        FROM directory_users WHERE deleted_at IS NULL
    """,
    "desired_memberships": """
        SELECT organization_id, group_id, user_id, group_name FROM group_memberships
    """,
    "desired_roles": """
        SELECT DISTINCT organization_id, user_id, role_name FROM role_assignments
    """,
}


# What brings a file of an older version up to date, per version. Every statement is idempotent (a new file already
# has the columns), so they simply all run whenever a process first opens a file.
UPGRADES: dict[int, list[str]] = {
    2: [
        "ALTER TABLE change_sets ADD COLUMN IF NOT EXISTS hold_reason VARCHAR",
        "ALTER TABLE change_sets ADD COLUMN IF NOT EXISTS dead_at TIMESTAMP",
        "ALTER TABLE change_sets ADD COLUMN IF NOT EXISTS attempts_at_revival INTEGER DEFAULT 0",
        "ALTER TABLE change_sets ADD COLUMN IF NOT EXISTS replaces VARCHAR",
        "ALTER TABLE organization_settings ADD COLUMN IF NOT EXISTS deprovision_window_hours DOUBLE",
        # Before version 2 only the guard held changes, and a dead change did not say since when.
        "UPDATE change_sets SET hold_reason = 'mass deprovisioning guard' WHERE status = 'held' AND hold_reason IS NULL",
        "UPDATE change_sets SET dead_at = created_at WHERE status = 'dead' AND dead_at IS NULL",
    ],
}


def create_all(con: duckdb.DuckDBPyConnection) -> None:
    """Create every table that does not exist yet, bring older tables up to date, and (re)define the views
    (idempotent)."""
    for name, columns in TABLES.items():
        added = ADDED_COLUMNS.get(name, {})
        con.execute(f"CREATE TABLE IF NOT EXISTS {name} ({columns}{''.join(f', {c} {t}' for c, t in added.items())})")
        for column, type_ in added.items():
            con.execute(f"ALTER TABLE {name} ADD COLUMN IF NOT EXISTS {column} {type_}")
    for version in sorted(UPGRADES):
        for statement in UPGRADES[version]:
            con.execute(statement)
    if con.execute("SELECT max(version) FROM schema_version").fetchall()[0][0] != SCHEMA_VERSION:
        con.execute("DELETE FROM schema_version")
        con.execute("INSERT INTO schema_version VALUES (?)", [SCHEMA_VERSION])
    for name, query in VIEWS.items():
        con.execute(f"CREATE OR REPLACE VIEW {name} AS {query}")
