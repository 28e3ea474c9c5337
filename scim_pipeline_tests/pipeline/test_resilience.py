"""Crashes and contention: a sync killed half-way, two syncs at once, SQL readers during a run."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from scim_pipeline.commands import query, run_sync


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


class Lines:
    """A process's output, read as it comes (a full pipe would block it), that a test can wait on."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.lines, self._new = proc, [], threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._new:
                self.lines.append(line)
                self._new.notify_all()
        with self._new:
            self.lines.append(None)  # end of output
            self._new.notify_all()

    def wait_for(self, text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        seen = 0
        with self._new:
            while True:
                for line in self.lines[seen:]:
                    if line is None:
                        pytest.fail(f"the process ended before printing {text!r}:\n{self.text()[-3000:]}")
                    if text in line:
                        return line
                seen = len(self.lines)
                if not self._new.wait(max(0.0, deadline - time.monotonic())) and time.monotonic() >= deadline:
                    pytest.fail(f"no {text!r} within {timeout:.0f}s:\n{self.text()[-3000:]}")

    def text(self) -> str:
        return "".join(line for line in self.lines if line)

    def wait_exit(self, timeout: float, failure: str) -> None:
        """Wait for the process to end; one that does not is made to print its threads (SIGABRT, with
        PYTHONFAULTHANDLER set) and fails the test with ``failure`` and its output."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGABRT)
            self.proc.wait(30)
            pytest.fail(f"{failure}:\n{self.text()[-6000:]}")


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a live process so far."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop_a_sync_holding_the_warehouse(world) -> subprocess.Popen:
    """A sync whose process is alive but stopped (SIGSTOP: a hung writer) while its run holds the warehouse slot."""
    run_sync(say=lambda _: None)
    world.emulator.faults(latency_ms=40)
    holder = cli("sync")
    holder_out = Lines(holder)
    holder_out.wait_for("[1/4]", 120)
    holder.send_signal(signal.SIGSTOP)
    world.emulator.faults(latency_ms=0)
    holder.holder_out = holder_out
    return holder


def resume(holder: subprocess.Popen) -> None:
    """Let the stopped sync go on to its end (an organization whose call to Scalekit timed out while it was stopped
    may fail: that is the stop's doing, not the test's subject)."""
    holder.send_signal(signal.SIGCONT)
    holder.wait(120)


def assert_nothing_left_behind(world) -> None:
    """No run is left started, no slot held; a sync then runs to the end and converges."""
    import dagster as dg

    from scim_pipeline.defs.instance import dagster_instance

    instance = dagster_instance()
    assert not instance.get_run_records(dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]))
    assert not instance.event_log_storage.get_concurrency_info("warehouse").claimed_slots
    said = []
    run_sync(say=said.append)
    assert not any("had died" in line for line in said)
    assert world.differences() == []


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="CPU time of another process is read from /proc")
@pytest.mark.world(orgs=4, users_per_org=60)
def test_a_sync_waiting_for_the_warehouse_sleeps_names_the_holder_and_gives_up(world):
    holder = stop_a_sync_holding_the_warehouse(world)
    try:
        waiting = cli("sync", env={"SCIM_PIPELINE_WAREHOUSE_WAIT_S": "20", "PYTHONFAULTHANDLER": "1"})
        out = Lines(waiting)
        said = out.wait_for("Waiting for the warehouse", 60)
        assert f"pid {holder.pid} on" in said and "directory_sync" in said, said
        before, started = cpu_seconds(waiting.pid), time.monotonic()
        time.sleep(5)
        spent = cpu_seconds(waiting.pid) - before
        assert spent < 0.1 * (time.monotonic() - started), f"the waiting sync used {spent:.1f}s of CPU in 5s"

        waiting.wait(60)
        assert waiting.returncode == 1, out.text()[-3000:]
        last = out.text().strip().splitlines()[-1]
        assert last.startswith("scim-pipeline sync: gave up waiting for the warehouse after 20s"), last
        assert f"pid {holder.pid} on" in last
    finally:
        resume(holder)
    assert_nothing_left_behind(world)


def own_runs(pid: int) -> list:
    """The runs a sync process recorded as its own, newest first."""
    import dagster as dg

    from scim_pipeline.defs.instance import dagster_instance
    from scim_pipeline.defs.run_process import PID_TAG

    return [r.dagster_run for r in dagster_instance().get_run_records(dg.RunsFilter(tags={PID_TAG: str(pid)}))]


STOP_S = 10  # "promptly": what a service manager waits before it kills


@pytest.mark.world(orgs=4, users_per_org=60)
def test_sigterm_stops_a_sync_waiting_for_the_warehouse_at_once_and_frees_its_claim(world):
    import dagster as dg

    holder = stop_a_sync_holding_the_warehouse(world)
    try:
        waiting = cli("sync", env={"PYTHONFAULTHANDLER": "1"})  # the default bound: minutes
        out = Lines(waiting)
        out.wait_for("Waiting for the warehouse", 60)
        waiting.send_signal(signal.SIGTERM)
        out.wait_exit(STOP_S, f"SIGTERM did not stop the sync within {STOP_S}s")
        assert waiting.returncode == -signal.SIGTERM, out.text()[-3000:]
        last = out.text().strip().splitlines()[-1]
        assert last.startswith("scim-pipeline sync: stopped by SIGTERM"), last
        runs = own_runs(waiting.pid)
        assert runs and runs[0].status in (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)
        assert runs[0].run_id[:8] in last
    finally:
        resume(holder)
    assert_nothing_left_behind(world)


@pytest.mark.world(orgs=4, users_per_org=120)
def test_sigterm_stops_a_running_sync_promptly_leaving_nothing_half_written_or_held(world):
    import dagster as dg

    run_sync(say=lambda _: None)
    truth = world.emulator.state()
    world.emulator.mutate([
        {"op": "update_user", "user_id": u["id"], "changes": {"family_name": "Moved"}}
        for o in truth["organizations"] for u in o["users"]
    ])
    world.emulator.faults(latency_ms=150)  # organizations take seconds each to list
    proc = cli("sync", env={"PYTHONFAULTHANDLER": "1"})
    out = Lines(proc)
    out.wait_for("[1/4]", 120)
    proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    out.wait_exit(STOP_S, f"SIGTERM did not stop the sync within {STOP_S}s")
    print(f"stopped {time.monotonic() - started:.1f}s after SIGTERM")
    assert proc.returncode == -signal.SIGTERM, out.text()[-3000:]
    last = out.text().strip().splitlines()[-1]
    assert last.startswith("scim-pipeline sync: stopped by SIGTERM"), last
    run = own_runs(proc.pid)[0]
    assert run.job_name == "directory_sync" and run.run_id[:8] in last
    assert run.status in (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)

    per_org = query("""SELECT organization_id, count(*) FILTER (WHERE family_name = 'Moved') AS moved, count(*) AS n
                       FROM directory_users GROUP BY 1""")
    for row in per_org.itertuples():
        assert row.moved in (0, row.n), f"{row.organization_id} is half-written: {row.moved} of {row.n}"
    world.emulator.faults(latency_ms=0)
    assert_nothing_left_behind(world)
