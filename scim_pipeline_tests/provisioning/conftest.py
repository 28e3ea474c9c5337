from datetime import datetime, timedelta

import pytest

from scim_pipeline.warehouse.connection import Warehouse

T0 = datetime(2026, 1, 1, 12, 0, 0)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


@pytest.fixture
def warehouse(tmp_path):
    return Warehouse(tmp_path / "warehouse.duckdb")


@pytest.fixture
def con(warehouse):
    """One writing transaction over a real DuckDB file, committed at the end of the test."""
    with warehouse.write() as connection:
        yield connection


def add_user(con, user_id, org="org_a", email=None, given="G", family="F", username=None, active=True, deleted=False):
    con.execute(
        "INSERT OR REPLACE INTO directory_users (user_id, organization_id, directory_id, email, given_name, family_name,"
        " preferred_username, active, deleted_at) VALUES (?, ?, 'dir_1', ?, ?, ?, ?, ?, ?)",
        [user_id, org, email or f"{user_id}@example.com", given, family, username or user_id, active,
         T0 if deleted else None],
    )


def add_group(con, group_id, name, org="org_a", deleted=False):
    con.execute(
        "INSERT OR REPLACE INTO directory_groups (group_id, organization_id, directory_id, display_name, deleted_at)"
        " VALUES (?, ?, 'dir_1', ?, ?)",
        [group_id, org, name, T0 if deleted else None],
    )


def add_member(con, group_id, user_id, org="org_a"):
    con.execute("INSERT OR REPLACE INTO directory_user_groups VALUES (?, ?, ?)", [org, user_id, group_id])
