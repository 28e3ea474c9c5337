"""The webhook path and a full sync share the warehouse: the sync holds it only while it writes an organization, so
incremental runs write in between (interleaving), and the pool serves writers in the order they asked, so a burst of
webhook runs never keeps the sync from finishing (fairness)."""

import subprocess
import sys
import time

import pytest

from scim_pipeline.commands import run_sync
from scim_pipeline.defs.instance import dagster_instance
from scim_pipeline_tests.pipeline.test_resilience import Lines, cli
from scim_pipeline_tests.pipeline.test_webhook_events import apply_webhooks, start_receiver, wait_for_inbox

ORGS = 24
SLOW_SCALEKIT_MS = 1500  # each organization takes seconds to list: the sync runs far longer than a webhook run


def slow_full_sync(world):
    """A full sync of every organization in one run, in another process, once it has written its first one."""
    run_sync(say=lambda _: None)  # the partitions and the catalogue exist: the run below is a re-sync
    world.emulator.faults(latency_ms=SLOW_SCALEKIT_MS)
    sync = cli("sync", env={"SCIM_PIPELINE_ORGS_PER_RUN": str(ORGS), "PYTHONFAULTHANDLER": "1"})
    out = Lines(sync)
    out.wait_for(f"[1/{ORGS}]", 120)
    return sync, out


def finish(sync, out: Lines, timeout: float) -> str:
    """The whole output of the sync, once it has ended (made to print its threads and failed if it does not)."""
    out.wait_exit(timeout, f"the sync still ran after {timeout:.0f}s")
    out.wait_for("took ", 30)  # its summary: the last line
    return out.text()


@pytest.mark.world(orgs=ORGS, users_per_org=10, groups_per_org=2)
def test_an_incremental_run_completes_while_a_full_sync_of_many_organizations_is_in_progress(world):
    receiver = start_receiver(world)
    try:
        sync, out = slow_full_sync(world)
        org = world.emulator.state()["organizations"][-1]
        leaver = sorted(org["users"], key=lambda u: u["id"])[0]
        [result] = world.emulator.mutate([{"op": "deactivate_user", "user_id": leaver["id"]}])
        wait_for_inbox(set(result["event_ids"]))
        started = time.monotonic()
        apply_webhooks(None)  # the sensor's incremental run, then a delivery run, executed here
        took = time.monotonic() - started
        assert sync.poll() is None, f"the full sync ended before the incremental run did:\n{out.text()[-3000:]}"
        users = {u["user_id"]: u for u in world.app_state()["users"]}
        assert users[leaver["id"]]["active"] is False, "the leaver still has access in the application"
        synced_before = sum(f"/{ORGS}]" in line for line in out.lines if line)
        assert synced_before < ORGS, "every organization was written before the incremental run finished"
        print(f"incremental run and delivery: {took:.1f}s, while the full sync had written {synced_before} of {ORGS}")

        world.emulator.faults(latency_ms=0)
        text = finish(sync, out, 240)
        assert sync.returncode == 0, text[-3000:]
    finally:
        receiver.stop()
    assert world.differences() == []


@pytest.mark.world(orgs=ORGS, users_per_org=10, groups_per_org=2)
def test_a_burst_of_webhook_runs_never_starves_the_reconciliation(world):
    sync, out = slow_full_sync(world)
    orgs, stop = world.org_ids(), world.home / "stop-burst"
    # Three processes launching webhook runs back to back: the warehouse always has a writer waiting.
    bursts = [subprocess.Popen([sys.executable, "-m", "scim_pipeline_tests.pipeline.webhook_burst", str(stop),
                                *orgs[w::3]], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
              for w in range(3)]
    try:
        text = finish(sync, out, 240)  # the reconciliation ends while the burst goes on
    finally:
        stop.touch()
        outputs = [burst.communicate(timeout=120)[0] for burst in bursts]
    assert sync.returncode == 0, text[-3000:]
    assert f"[{ORGS}/{ORGS}]" in text
    summaries = [output.strip().splitlines()[-1] for output in outputs]
    assert all(s.startswith("ran ") and s.endswith(" failed 0") for s in summaries), summaries
    ran = sum(int(s.split()[1]) for s in summaries)
    assert ran >= 3, "the burst never overlapped the sync"
    print(f"{ran} webhook runs during and just after the reconciliation")
    world.emulator.faults(latency_ms=0)
    assert not dagster_instance().event_log_storage.get_concurrency_info("warehouse").claimed_slots
