"""The dead-run reaper on a real Dagster instance in a temporary folder, with real runs in processes of their own
that hold the warehouse pool's slot until they are killed."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import dagster as dg
import pytest

from scim_pipeline.defs import run_process
from scim_pipeline.defs.instance import ensure_dagster_home
from scim_pipeline.defs.partitions import WAREHOUSE_POOL
from scim_pipeline.defs.run_reaper import reap_dead_runs

START_S = 60


@pytest.fixture
def instance(home, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster"))
    ensure_dagster_home()  # the project's instance settings: the warehouse pool holds one slot
    with dg.DagsterInstance.get() as instance:
        yield instance


class HoldingRun:
    """``scim_pipeline_tests.defs.holding_run`` in a process of its own, once it holds the warehouse slot."""

    def __init__(self, *args: str):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "scim_pipeline_tests.defs.holding_run", *args],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True,
            cwd=Path(__file__).resolve().parents[2])
        line = _readline(self.process, START_S)
        assert line.startswith("holding "), f"the run did not start: {line!r}"
        self.run_id = line.split()[1]

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)


def _readline(process: subprocess.Popen, timeout: float) -> str:
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not lines:
        process.kill()
        pytest.fail(f"no line from the run within {timeout:.0f}s")
    return lines[0].strip()


@pytest.fixture
def holding(instance):
    runs: list[HoldingRun] = []

    def start(*args: str) -> HoldingRun:
        runs.append(HoldingRun(*args))
        return runs[-1]

    yield start
    for run in runs:
        run.kill()


def slot_holders(instance) -> set[str]:
    return {slot.run_id for slot in instance.event_log_storage.get_concurrency_info(WAREHOUSE_POOL).claimed_slots}


def test_a_run_whose_process_died_is_found_whatever_it_logged_last(instance, holding):
    run = holding("--lines", "60")  # far more records than the pid's last event is from the end
    assert slot_holders(instance) == {run.run_id}
    tags = instance.get_run_by_id(run.run_id).tags
    assert tags[run_process.HOST_TAG] == run_process.host()
    assert tags[run_process.PID_TAG] == str(run.process.pid)

    assert reap_dead_runs(instance) == []  # alive: left alone
    run.kill()
    assert reap_dead_runs(instance) == [run.run_id]
    reaped = instance.get_run_by_id(run.run_id)
    assert reaped.status == dg.DagsterRunStatus.FAILURE
    assert slot_holders(instance) == set()
    assert reap_dead_runs(instance) == []


def test_a_run_recorded_on_another_host_is_never_judged(instance, holding):
    run = holding()
    # A second host sharing this storage: its run's pid means nothing here.
    instance.add_run_tags(run.run_id, {run_process.HOST_TAG: "another-host.example"})
    run.kill()
    assert reap_dead_runs(instance) == []
    assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.STARTED
    assert slot_holders(instance) == {run.run_id}


def test_a_run_with_no_record_of_its_process_is_not_judged(instance, holding):
    run = holding("--untracked")
    assert run_process.HOST_TAG not in instance.get_run_by_id(run.run_id).tags
    run.kill()
    assert reap_dead_runs(instance) == []
    assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.STARTED


def test_a_process_record_copied_from_another_run_is_not_trusted(instance, holding):
    dead = holding()
    dead.kill()
    assert reap_dead_runs(instance) == [dead.run_id]  # its slot is free for the next run
    copied = {k: v for k, v in instance.get_run_by_id(dead.run_id).tags.items() if k.startswith("scim_pipeline/")}
    run = holding("--untracked")
    instance.add_run_tags(run.run_id, copied)  # as a re-execution copies its parent's tags
    assert reap_dead_runs(instance, [run.run_id]) == []
    assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.STARTED


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="process start times are read from /proc")
def test_a_pid_now_used_by_another_process_counts_as_dead(instance, holding):
    run = holding()
    started = instance.get_run_by_id(run.run_id).tags[run_process.STARTED_TAG]
    boot, ticks = started.rsplit(":", 1)
    # The same number, recorded for a process that started earlier than the one now holding it.
    instance.add_run_tags(run.run_id, {run_process.STARTED_TAG: f"{boot}:{int(ticks) - 1}"})
    assert reap_dead_runs(instance) == [run.run_id]
    assert os.kill(run.process.pid, 0) is None  # the process itself was left alone

