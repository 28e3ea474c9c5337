import time

import duckdb
import pytest

from scim_pipeline.warehouse.connection import Warehouse, WarehouseBusy


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
    import subprocess
    import sys

    path = tmp_path / "w.duckdb"
    with Warehouse(path).write():
        pass
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); print('held', flush=True); time.sleep(1.5)",
         str(path)],
        stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    started = time.monotonic()
    with Warehouse(path, lock_timeout_s=30).write() as con:
        con.execute("INSERT INTO organizations VALUES ('org_1', 'One', 'ext', now())")
    assert time.monotonic() - started > 0.5  # it really waited for the other process
    holder.wait()
    with pytest.raises(WarehouseBusy):
        holder = subprocess.Popen(
            [sys.executable, "-c",
             "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); print('held', flush=True); time.sleep(3)",
             str(path)],
            stdout=subprocess.PIPE, text=True,
        )
        try:
            assert holder.stdout.readline().strip() == "held"
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
    import subprocess
    import sys

    path = tmp_path / "w.duckdb"
    with Warehouse(path).write():
        pass
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); print('held', flush=True); time.sleep(30)",
         str(path)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
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
