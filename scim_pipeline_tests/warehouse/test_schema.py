"""The schema brings a warehouse file written by an older version up to date when it is opened."""

from datetime import datetime

import duckdb

from scim_pipeline.warehouse.connection import Warehouse
from scim_pipeline.warehouse.schema import SCHEMA_VERSION

# change_sets and organization_settings as version 1 created them.
VERSION_1 = """
CREATE TABLE change_sets (
    change_id VARCHAR PRIMARY KEY, organization_id VARCHAR NOT NULL, entity VARCHAR NOT NULL, op VARCHAR NOT NULL,
    entity_key VARCHAR NOT NULL, payload JSON, status VARCHAR NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    last_error VARCHAR, created_at TIMESTAMP NOT NULL, delivered_at TIMESTAMP, next_attempt_at TIMESTAMP,
    batch_id VARCHAR, in_doubt BOOLEAN NOT NULL DEFAULT false);
CREATE TABLE organization_settings (
    organization_id VARCHAR PRIMARY KEY, deprovision_threshold DOUBLE, approved_at TIMESTAMP,
    deprovision_min_users INTEGER);
"""
T0 = datetime(2026, 1, 1)


def columns(con, table):
    return [r[0] for r in con.execute(f"SELECT column_name FROM information_schema.columns WHERE table_name = '{table}' "
                                      "ORDER BY ordinal_position").fetchall()]


def test_a_version_1_file_gets_the_new_columns_and_keeps_its_rows(tmp_path):
    path = tmp_path / "warehouse.duckdb"
    con = duckdb.connect(str(path))
    con.execute(VERSION_1)
    con.execute("INSERT INTO change_sets (change_id, organization_id, entity, op, entity_key, status, attempts, "
                "created_at) VALUES ('chg_held', 'org_a', 'user', 'deactivate', 'u1', 'held', 0, ?), "
                "('chg_dead', 'org_a', 'user', 'create', 'u2', 'dead', 8, ?)", [T0, T0])
    con.execute("INSERT INTO organization_settings (organization_id, deprovision_threshold) VALUES ('org_a', 0.5)")
    con.close()

    with Warehouse(path).write() as con:
        assert {"hold_reason", "dead_at", "attempts_at_revival", "replaces"} <= set(columns(con, "change_sets"))
        assert "deprovision_window_hours" in columns(con, "organization_settings")
        rows = con.execute("SELECT change_id, status, attempts, hold_reason, dead_at, attempts_at_revival "
                           "FROM change_sets ORDER BY 1").fetchall()
        # Before version 2 only the guard held changes; a dead change's age is taken from its creation.
        assert rows == [("chg_dead", "dead", 8, None, T0, 0), ("chg_held", "held", 0, "mass deprovisioning guard", None, 0)]
        assert con.execute("SELECT deprovision_threshold FROM organization_settings").fetchall() == [(0.5,)]
        assert con.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]


def test_a_new_file_and_an_upgraded_one_have_the_same_columns(tmp_path):
    old = tmp_path / "old.duckdb"
    con = duckdb.connect(str(old))
    con.execute(VERSION_1)
    con.close()
    with Warehouse(old).write() as upgraded, Warehouse(tmp_path / "new.duckdb").write() as new:
        for table in ("change_sets", "organization_settings"):
            assert sorted(columns(upgraded, table)) == sorted(columns(new, table))
