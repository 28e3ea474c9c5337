"""Crashes and contention: a sync killed half-way, two syncs at once, SQL readers during a run."""

import os
import signal
import subprocess
import sys
import threading
import time

from scim_pipeline.commands import query, run_sync

import pytest


def cli(*args, env=None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "scim_pipeline.cli", *args], env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


@pytest.mark.world(orgs=4, users_per_org=120)
def test_a_sync_killed_half_way_leaves_no_organization_half_written(world):
    run_sync(say=lambda _: None)
    truth = world.emulator.state()
    world.emulator.mutate([
        {"op": "update_user", "user_id": u["id"], "changes": {"family_name": "Moved"}}
        for o in truth["organizations"] for u in o["users"]
    ])
    world.emulator.faults(latency_ms=25)  # organizations finish listing one after the other, not all at once
    proc = cli("sync")
    for line in proc.stdout:
        if "[1/4]" in line:  # the first organization is committed; the others are still being listed
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL

    per_org = query("""SELECT organization_id, count(*) FILTER (WHERE family_name = 'Moved') AS moved, count(*) AS n
                       FROM directory_users GROUP BY 1""")
    assert len(per_org) == 4
    for row in per_org.itertuples():
        assert row.moved in (0, row.n), f"{row.organization_id} is half-written: {row.moved} of {row.n}"
    assert (per_org.moved == per_org.n).sum() >= 1  # the one reported done is in

    # The killed run still holds the warehouse pool's slot: the next sync fails it and frees the slot, then
    # converges everything.
    world.emulator.faults(latency_ms=0)
    said = []
    run_sync(say=said.append)
    assert any("had died half-way" in line for line in said)
    assert world.differences() == []


HANG_S = 200  # far beyond the 30 s these syncs take; under pytest's own 300 s timeout


def test_two_syncs_at_once_both_succeed_and_sql_never_breaks_them(world):
    run_sync(say=lambda _: None)  # the catalogue and partitions exist; both runs below do real work
    world.emulator.faults(latency_ms=5)
    # With faulthandler on, a sync that hangs is made to print where (SIGABRT) instead of timing the test out mute.
    first, second = (cli("sync", env={"PYTHONFAULTHANDLER": "1"}) for _ in range(2))
    deadline = time.monotonic() + HANG_S
    # Their output is read as it comes: a pipe left full would block a sync in a write, and the test with it.
    outputs: dict[int, str] = {}
    drains = [threading.Thread(target=lambda p=p: outputs.__setitem__(p.pid, p.stdout.read()))
              for p in (first, second)]
    for drain in drains:
        drain.start()
    sql_failures, sql_runs = [], 0
    while first.poll() is None or second.poll() is None:
        if time.monotonic() > deadline:
            for sync in (first, second):
                if sync.poll() is None:
                    sync.send_signal(signal.SIGABRT)
            for drain in drains:
                drain.join(10)
            pytest.fail(f"a sync still ran after {HANG_S}s; its threads:\n" + "\n".join(
                outputs.get(sync.pid, "")[-6000:] for sync in (first, second)))
        reader = subprocess.run([sys.executable, "-m", "scim_pipeline.cli", "sql",
                                 "SELECT count(*) FROM directory_users"], capture_output=True, text=True,
                                timeout=HANG_S)
        sql_runs += 1
        if reader.returncode != 0:
            sql_failures.append(reader.stderr)
    for drain in drains:
        drain.join()
    out_first, out_second = outputs[first.pid], outputs[second.pid]
    assert first.returncode == 0, out_first[-2000:]
    assert second.returncode == 0, out_second[-2000:]
    assert sql_runs >= 1 and not sql_failures
    assert world.differences() == []


def finish(proc: subprocess.Popen, timeout: float) -> str:
    """The output of a sync that must end within ``timeout``; one that does not is made to print its threads
    (it runs with PYTHONFAULTHANDLER) and the test fails with them."""
    try:
        out, _ = proc.communicate(timeout=timeout)
        return out
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        out, _ = proc.communicate(timeout=30)
        pytest.fail(f"the sync still ran after {timeout:.0f}s:\n{out[-6000:]}")


@pytest.mark.world(orgs=30, users_per_org=6, groups_per_org=2)
def test_a_sync_killed_after_more_than_twenty_organizations_does_not_hang_the_next(world):
    # One run for all 30 organizations: each logs a progress line, so the run's last records carry no process id.
    env = {"SCIM_PIPELINE_ORGS_PER_RUN": "30", "PYTHONFAULTHANDLER": "1"}
    world.emulator.faults(latency_ms=150)
    proc = cli("sync", env=env)
    for line in proc.stdout:
        if "[25/30]" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, "the sync ended before it could be killed half-way"

    world.emulator.faults(latency_ms=0)
    second = cli("sync", env=env)
    out = finish(second, 120)
    assert second.returncode == 0, out[-3000:]
    assert "had died half-way" in out
    assert world.differences() == []
