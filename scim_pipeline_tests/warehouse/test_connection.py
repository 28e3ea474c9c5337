import subprocess
import sys
import time

import duckdb
import pytest

from scim_pipeline.warehouse.connection import Warehouse, WarehouseBusy


def hold_lock(path, seconds: float) -> subprocess.Popen:
    """Another process holding the warehouse file's lock for ``seconds``; returns once it holds it."""
    holder = subprocess.Popen(
        [sys.executable, "-c",
         f"import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); print('held', flush=True); time.sleep({seconds})",
         str(path)],
        stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_write_commits_and_rolls_back(tmp_path):
    wh = Warehouse(tmp_path / "w.duckdb")
    with wh.write() as con:
        con.execute("INSERT INTO organizations VALUES ('org_1', 'One', 'ext', now())")
    with pytest.raises(RuntimeError):
        with wh.write() as con:
            con.execute("INSERT INTO organizations VALUES ('org_2', 'Two', 'ext', now())")
            raise RuntimeError("boom")
    with wh.read() as con:
        assert con.execute("SELECT organization_id FROM organizations").fetchall() == [("org_1",)]


def test_lock_is_released_after_an_error_and_readers_are_read_only(tmp_path):
    wh = Warehouse(tmp_path / "w.duckdb")
    with pytest.raises(duckdb.Error):
        with wh.write() as con:
            con.execute("SELECT * FROM no_such_table")
    # The failed writer released the file: another connection (a new process would see the same) opens it at once.
    with wh.read() as con:
        with pytest.raises(duckdb.Error):
            con.execute("CREATE TABLE t (x INT)")


def test_writer_waits_for_a_lock_held_by_another_process(tmp_path):
    path = tmp_path / "w.duckdb"
    with Warehouse(path).write():
        pass
    holder = hold_lock(path, 1.5)
    started = time.monotonic()
    with Warehouse(path, lock_timeout_s=30).write() as con:
        con.execute("INSERT INTO organizations VALUES ('org_1', 'One', 'ext', now())")
    assert time.monotonic() - started > 0.5  # it really waited for the other process
    holder.wait()
    with pytest.raises(WarehouseBusy):
        holder = hold_lock(path, 3)
        try:
            with Warehouse(path, lock_timeout_s=0.5).write():
                pass
        finally:
            holder.wait()


def test_a_deleted_warehouse_file_gets_its_schema_again(tmp_path):
    path = tmp_path / "w.duckdb"
    with Warehouse(path).write() as con:
        con.execute("INSERT INTO organizations VALUES ('org_1', 'One', 'ext', now())")
    path.unlink()
    with Warehouse(path).write() as con:  # same process: the schema cache must not hide the new file
        assert con.execute("SELECT count(*) FROM organizations").fetchone() == (0,)


def test_a_waiting_writer_sleeps_says_which_process_holds_the_lock_and_gives_up(tmp_path):
    path = tmp_path / "w.duckdb"
    with Warehouse(path).write():
        pass
    holder = hold_lock(path, 30)
    try:
        said = []
        cpu, started = time.process_time(), time.monotonic()
        with pytest.raises(WarehouseBusy) as caught:
            with Warehouse(path, lock_timeout_s=3, on_wait=said.append).write():
                pass
        waited = time.monotonic() - started
        assert 3 <= waited < 10
        assert time.process_time() - cpu < 0.3 * waited  # asleep between attempts, not spinning
        assert len(said) == 1 and f"PID {holder.pid}" in said[0], said
        message = str(caught.value)
        assert "\n" not in message and f"PID {holder.pid}" in message and "3s" in message, message
    finally:
        holder.kill()
        holder.wait()


# The first release's tables whose columns have grown since, as a warehouse file of that release has them.
FIRST_RELEASE = {
    "directories": """directory_id VARCHAR PRIMARY KEY, organization_id VARCHAR NOT NULL, name VARCHAR,
        provider VARCHAR, directory_type VARCHAR, enabled BOOLEAN, role_assignments JSON, total_users INTEGER,
        total_groups INTEGER, synced_at TIMESTAMP""",
    "directory_users": """user_id VARCHAR PRIMARY KEY, organization_id VARCHAR NOT NULL, directory_id VARCHAR,
        email VARCHAR, given_name VARCHAR, family_name VARCHAR, preferred_username VARCHAR, active BOOLEAN,
        emails JSON, updated_at TIMESTAMP, detail JSON, deleted_at TIMESTAMP, synced_at TIMESTAMP,
        event_at TIMESTAMP""",
    "directory_groups": """group_id VARCHAR PRIMARY KEY, organization_id VARCHAR NOT NULL, directory_id VARCHAR,
        display_name VARCHAR, updated_at TIMESTAMP, detail JSON, deleted_at TIMESTAMP, synced_at TIMESTAMP,
        event_at TIMESTAMP""",
    "webhook_events": """event_id VARCHAR, webhook_id VARCHAR PRIMARY KEY, type VARCHAR, organization_id VARCHAR,
        occurred_at TIMESTAMP, received_at TIMESTAMP, applied_at TIMESTAMP, outcome VARCHAR, inbox_seq BIGINT""",
}


def test_a_warehouse_of_the_first_release_is_upgraded_in_place(tmp_path):
    from scim_pipeline.warehouse.schema import ADDED_COLUMNS

    path = tmp_path / "w.duckdb"
    with duckdb.connect(str(path)) as con:
        for name, columns in FIRST_RELEASE.items():
            con.execute(f"CREATE TABLE {name} ({columns})")
        con.execute("INSERT INTO webhook_events (webhook_id, outcome, inbox_seq) VALUES ('msg_1', 'applied', 7)")
        con.execute("INSERT INTO directory_users (user_id, organization_id, event_at)"
                    " VALUES ('diruser_1', 'org_1', '2026-01-01 00:00:00.000001')")
    assert set(FIRST_RELEASE) == set(ADDED_COLUMNS)
    for _ in range(2):  # and again: upgrading is idempotent
        with Warehouse(path).write():
            pass
        with Warehouse(path).read() as con:
            for name, added in ADDED_COLUMNS.items():
                columns = [r[0] for r in con.execute(f"DESCRIBE {name}").fetchall()]
                assert columns[-len(added):] == list(added), name
            assert con.execute("SELECT webhook_id, outcome, inbox_seq, reason FROM webhook_events").fetchall() == [
                ("msg_1", "applied", 7, None)]
            assert con.execute("SELECT user_id, event_nanos, event_seq FROM directory_users").fetchall() == [
                ("diruser_1", None, None)]
            assert con.execute("SELECT count(*) FROM webhook_progress").fetchone() == (0,)  # a new table
    # A new file has the same columns in the same order.
    with Warehouse(tmp_path / "new.duckdb").read() as new, Warehouse(path).read() as old:
        for name in ADDED_COLUMNS:
            assert new.execute(f"DESCRIBE {name}").fetchall() == old.execute(f"DESCRIBE {name}").fetchall()
