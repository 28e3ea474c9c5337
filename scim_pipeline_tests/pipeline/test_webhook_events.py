"""The incremental path without the daemon: webhooks through the real receiver into the inbox, the webhook
sensor's run requests executed here, then delivery. Duplicates, reordering and late replays end in the truth."""

import json
import subprocess
import sys
import time

import dagster as dg
import httpx
import pytest

from scim_pipeline.commands import query, run_sync
from scim_pipeline.config import settings
from scim_pipeline.definitions import defs
from scim_pipeline.defs.instance import dagster_instance
from scim_pipeline.defs.webhooks.sensor import webhook_events_sensor
from scim_pipeline.devstack import services
from scim_pipeline.receiver.inbox import Inbox
from scim_pipeline_tests.receiver.helpers import signed


def start_receiver(world):
    """The real receiver, in the world's home, with the emulator's webhooks pointed at it."""
    receiver = services.start("webhooks", [], world.home, ready=lambda s: services.port_open("127.0.0.1", s.port))
    world.emulator.set_webhook_url(f"{receiver.url}/webhooks/scalekit")
    return receiver


@pytest.fixture
def receiver(world):
    receiver = start_receiver(world)
    yield receiver
    receiver.stop()


def wait_for_inbox(event_ids: set[str], timeout: float = 30) -> None:
    inbox = Inbox(settings().inbox_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if event_ids <= {e.event_id for e in inbox.read_after(0, 100_000)}:
            return
        time.sleep(0.1)
    raise AssertionError("the events did not all reach the inbox")


def post_event(world, receiver, envelope: dict, webhook_id: str) -> None:
    """A signed event, as Scalekit would send it, straight to the receiver."""
    body = json.dumps(envelope).encode()
    secret = world.emulator.env["SCALEKIT_WEBHOOK_SECRET"]
    answer = httpx.post(f"{receiver.url}/webhooks/scalekit", content=body,
                        headers={**signed(secret, body, webhook_id), "content-type": "application/json"})
    assert answer.status_code == 200, answer.text


def apply_webhooks(cursor: str | None) -> str | None:
    """One tick of the webhook sensor, its runs executed in this process, then one delivery run."""
    instance = dagster_instance()
    with dg.build_sensor_context(instance=instance, cursor=cursor) as context:
        result = webhook_events_sensor(context)
    if isinstance(result, dg.SkipReason):
        return cursor
    for request in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    for request in result.run_requests:
        job = defs.resolve_job_def(request.job_name)
        outcome = job.execute_in_process(instance=instance, partition_key=request.partition_key,
                                         run_config=request.run_config)
        assert outcome.success
    deliver = defs.resolve_job_def("deliver_changes")
    assert deliver.execute_in_process(instance=instance, run_config={
        "ops": {"deliver": {"config": {"backoff_s": 0}}}}).success
    return result.cursor


def test_duplicated_reordered_and_delayed_events_end_in_the_directory_truth(world, receiver):
    run_sync(say=lambda _: None)
    org = world.emulator.state()["organizations"][0]
    users = sorted(org["users"], key=lambda u: u["id"])
    flip, renamed, leaver = users[0], users[1], users[2]
    world.emulator.faults(webhook_duplicate_rate=0.5, webhook_reorder_window=5, webhook_delay_ms=20)
    results = world.emulator.mutate([
        {"op": "update_user", "user_id": renamed["id"], "changes": {"family_name": "First"}},
        {"op": "deactivate_user", "user_id": flip["id"]},
        {"op": "update_user", "user_id": renamed["id"], "changes": {"family_name": "Second"}},
        {"op": "reactivate_user", "user_id": flip["id"]},
        {"op": "update_user", "user_id": leaver["id"], "changes": {"given_name": "Leaving"}},
        {"op": "delete_user", "user_id": leaver["id"]},
        {"op": "deactivate_user", "user_id": flip["id"]},
        {"op": "rename_group", "group_id": org["groups"][0]["id"], "display_name": "Renamed Group"},
    ])
    wait_for_inbox({e for r in results for e in r["event_ids"]})
    apply_webhooks(None)

    rows = query(f"""SELECT user_id, family_name, active, deleted_at IS NOT NULL AS deleted FROM directory_users
                     WHERE user_id IN ('{flip["id"]}', '{renamed["id"]}', '{leaver["id"]}')""")
    by_id = {r.user_id: r for r in rows.itertuples()}
    assert by_id[renamed["id"]].family_name == "Second"
    assert not by_id[flip["id"]].active
    assert by_id[leaver["id"]].deleted
    outcomes = set(query("SELECT outcome FROM webhook_events").outcome)
    assert "applied" in outcomes and outcomes <= {"applied", "superseded", "stale"}
    assert world.differences() == []
    assert world.app_stats()["max_applications"] == 1


def test_a_late_update_never_brings_back_a_deleted_user(world, receiver):
    run_sync(say=lambda _: None)
    org = world.emulator.state()["organizations"][0]
    leaver = org["users"][0]
    results = world.emulator.mutate([{"op": "delete_user", "user_id": leaver["id"]}])
    wait_for_inbox(set(results[0]["event_ids"]))
    cursor = apply_webhooks(None)
    deleted_at = query(f"SELECT deleted_at FROM directory_users WHERE user_id = '{leaver['id']}'").deleted_at[0]

    # Scalekit retries for hours: an update older than the delete arrives now, under a new webhook id.
    late = {"spec_version": "1", "id": "evt_late_1", "type": "organization.directory.user_updated",
            "occurred_at": "2020-01-01T00:00:00Z", "environment_id": "env_1", "organization_id": org["id"],
            "object": "DirectoryUser",
            "data": {"id": leaver["id"], "organization_id": org["id"], "email": leaver["email"],
                     "active": True, "given_name": "Back", "family_name": "Again", "groups": []}}
    body = json.dumps(late).encode()
    secret = world.emulator.env["SCALEKIT_WEBHOOK_SECRET"]
    answer = httpx.post(f"{receiver.url}/webhooks/scalekit", content=body,
                        headers={**signed(secret, body, "msg_late_1"), "content-type": "application/json"})
    assert answer.status_code == 200
    apply_webhooks(cursor)

    row = query(f"SELECT given_name, deleted_at FROM directory_users WHERE user_id = '{leaver['id']}'")
    assert row.deleted_at[0] == deleted_at and row.given_name[0] != "Back"
    assert query("SELECT outcome FROM webhook_events WHERE event_id = 'evt_late_1'").outcome[0] == "stale"
    assert leaver["id"] not in {u["user_id"] for u in world.app_state()["users"]}


def test_a_user_of_a_directory_the_event_does_not_name_is_placed_by_a_full_sync_of_its_organization(world, receiver):
    """Scalekit's user events carry no directory_id. In an organization with two enabled directories, a new user in
    no group cannot be placed from the warehouse: the incremental run reads the organization again in full."""
    run_sync(say=lambda _: None)
    org = next(o for o in world.emulator.state()["organizations"] if len(o["directories"]) == 2)
    second = org["directories"][1]["id"]
    results = world.emulator.mutate([{"op": "create_user", "organization_id": org["id"], "directory_id": second,
                                      "user": {"email": "second.dir@example.com"}}])
    wait_for_inbox(set(results[0]["event_ids"]))
    apply_webhooks(None)
    placed = query(f"SELECT directory_id FROM directory_users WHERE user_id = '{results[0]['id']}'")
    assert list(placed.directory_id) == [second]
    assert "second.dir@example.com" in {u["email"] for u in world.app_state()["users"]}
    assert world.differences() == []


def test_a_disabled_directory_stops_delivery_until_it_is_enabled_again(world, receiver):
    run_sync(say=lambda _: None)
    org = world.emulator.state()["organizations"][0]
    directory = org["directories"][0]["id"]
    leaver = next(u for u in org["users"] if u["active"] and u["directory_id"] == directory)
    results = world.emulator.mutate([
        {"op": "disable_directory", "directory_id": directory},
        {"op": "deactivate_user", "user_id": leaver["id"]},
    ])
    wait_for_inbox({e for r in results for e in r["event_ids"]})
    cursor = apply_webhooks(None)
    held = query(f"SELECT status, hold_reason FROM change_sets WHERE entity_key = '{leaver['id']}' "
                 "AND op = 'deactivate'")
    assert list(held.status) == ["held"] and list(held.hold_reason) == ["directory disabled"]  # and says why
    assert next(u for u in world.app_state()["users"] if u["user_id"] == leaver["id"])["active"]

    results = world.emulator.mutate([{"op": "enable_directory", "directory_id": directory}])
    wait_for_inbox({e for r in results for e in r["event_ids"]})
    apply_webhooks(cursor)
    assert not next(u for u in world.app_state()["users"] if u["user_id"] == leaver["id"])["active"]


def test_an_event_naming_no_organization_touches_no_file_and_is_recorded_invalid(world, receiver):
    run_sync(say=lambda _: None)
    canaries = [world.home / "canary", world.home.parent / "canary"]
    for canary in canaries:
        canary.mkdir()
        (canary / "keep").write_text("x")
    org = world.emulator.state()["organizations"][0]
    strange = ["../canary", "../../canary", f"{org['id']}\n", "...", f"{org['id']}/../../canary"]
    for i, org_id in enumerate(strange):
        post_event(world, receiver, {
            "spec_version": "1", "id": f"evt_strange_{i}", "type": "organization.directory.user_created",
            "occurred_at": "2026-11-28T00:00:00Z", "environment_id": "env_1", "organization_id": org_id,
            "object": "DirectoryUser", "data": {"id": f"diruser_9{i}", "organization_id": org_id}},
            f"msg_strange_{i}")
    user = org["users"][0]
    results = world.emulator.mutate([{"op": "update_user", "user_id": user["id"],
                                      "changes": {"given_name": "Routed"}}])
    wait_for_inbox({f"evt_strange_{i}" for i in range(len(strange))} | set(results[0]["event_ids"]))
    apply_webhooks(None)

    assert all((canary / "keep").exists() for canary in canaries)
    rows = query("SELECT event_id, outcome, reason FROM webhook_events WHERE event_id LIKE 'evt_strange_%'")
    assert len(rows) == len(strange)
    assert set(rows.outcome) == {"invalid"}
    assert all("organization" in reason for reason in rows.reason)
    assert next(u for u in world.app_state()["users"] if u["user_id"] == user["id"])["given_name"] == "Routed"


def test_a_malformed_event_never_keeps_the_next_one_of_its_organization_from_the_application(world, receiver):
    run_sync(say=lambda _: None)
    org = world.emulator.state()["organizations"][0]
    first, second = sorted(org["users"], key=lambda u: u["id"])[:2]
    base = {"spec_version": "1", "type": "organization.directory.user_updated", "environment_id": "env_1",
            "organization_id": org["id"], "object": "DirectoryUser", "occurred_at": "2030-01-01T00:00:00Z",
            "data": {"id": first["id"], "organization_id": org["id"], "given_name": "Broken"}}
    malformed = {
        "evt_bad_time": {**base, "occurred_at": 12345},
        "evt_bad_data_id": {**base, "data": {**base["data"], "id": {"id": first["id"]}}},
        "evt_bad_active": {**base, "data": {**base["data"], "active": "no"}},
        "evt_bad_groups": {**base, "data": {**base["data"], "groups": [{"id": 7}]}},
    }
    for event_id, envelope in malformed.items():
        post_event(world, receiver, {**envelope, "id": event_id}, f"msg_{event_id}")
    results = world.emulator.mutate([{"op": "update_user", "user_id": second["id"],
                                      "changes": {"family_name": "StillDelivered"}}])
    wait_for_inbox(set(malformed) | set(results[0]["event_ids"]))
    apply_webhooks(None)

    delivered = next(u for u in world.app_state()["users"] if u["user_id"] == second["id"])
    assert delivered["family_name"] == "StillDelivered"
    rows = query("SELECT event_id, outcome, reason FROM webhook_events WHERE event_id LIKE 'evt_bad_%'")
    assert dict(zip(rows.event_id, rows.outcome)) == {event_id: "invalid" for event_id in malformed}
    reasons = dict(zip(rows.event_id, rows.reason))
    assert reasons["evt_bad_time"].startswith("occurred_at") and reasons["evt_bad_data_id"].startswith("data.id")
    untouched = query(f"SELECT given_name FROM directory_users WHERE user_id = '{first['id']}'")
    assert untouched.given_name[0] != "Broken"
    assert world.differences() == []


def sensor_tick(instance, cursor):
    with dg.build_sensor_context(instance=instance, cursor=cursor) as context:
        return webhook_events_sensor(context)


def requests_of(result) -> list:
    return [] if isinstance(result, dg.SkipReason) else list(result.run_requests)


def test_a_failed_incremental_run_is_asked_for_again_and_its_events_reach_the_application(world, receiver, monkeypatch):
    monkeypatch.setenv("SCIM_PIPELINE_EVENTS_RETRY_S", "2")
    run_sync(say=lambda _: None)
    org = world.emulator.state()["organizations"][0]
    leaver = next(u for u in org["users"] if u["active"])
    results = world.emulator.mutate([{"op": "deactivate_user", "user_id": leaver["id"]}])
    wait_for_inbox(set(results[0]["event_ids"]))
    instance = dagster_instance()
    job = defs.resolve_job_def("directory_events")

    first = sensor_tick(instance, None)
    (request,) = requests_of(first)
    # Another process holds the warehouse past the run's lock timeout: the run fails, its events unapplied.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import duckdb, sys; c = duckdb.connect(sys.argv[1]); print('held', flush=True);"
         " sys.stdin.read()", str(settings().warehouse_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        failed = job.execute_in_process(
            instance=instance, partition_key=request.partition_key, raise_on_error=False,
            run_config={**request.run_config, "resources": {"warehouse": {"config": {"lock_timeout_s": 0.5}}}})
        assert not failed.success
    finally:
        holder.stdin.close()
        holder.wait()

    # No new events and the failure is fresh: nothing yet.
    assert requests_of(sensor_tick(instance, first.cursor)) == []
    time.sleep(2.2)
    # A run of the organization in flight (queued, say): still nothing, it will apply them.
    queued = instance.create_run_for_job(job_def=job, run_config=request.run_config,
                                         tags={"dagster/partition": org["id"]})
    assert requests_of(sensor_tick(instance, first.cursor)) == []
    instance.delete_run(queued.run_id)

    (retry,) = requests_of(sensor_tick(instance, first.cursor))
    assert retry.partition_key == org["id"] and retry.run_key != request.run_key
    assert job.execute_in_process(instance=instance, partition_key=retry.partition_key,
                                  run_config=retry.run_config).success
    assert defs.resolve_job_def("deliver_changes").execute_in_process(instance=instance, run_config={
        "ops": {"deliver": {"config": {"backoff_s": 0}}}}).success
    assert not next(u for u in world.app_state()["users"] if u["user_id"] == leaver["id"])["active"]
    assert world.differences() == []

    # Applied: never asked for again; running it once more changes nothing.
    time.sleep(2.2)
    assert requests_of(sensor_tick(instance, first.cursor)) == []
    again = job.execute_in_process(instance=instance, partition_key=retry.partition_key,
                                   run_config=retry.run_config)
    snapshot = again.asset_materializations_for_node("directory_snapshot")[0].metadata
    assert snapshot["events"].value == 0
    assert query("SELECT count(*) AS n FROM webhook_events").n[0] == len(results[0]["event_ids"])


@pytest.mark.world(orgs=1, users_per_org=60)
def test_deletions_spread_over_webhook_runs_are_held_once_they_add_up_past_the_guard(world, receiver):
    from scim_pipeline.cli import main

    run_sync(say=lambda _: None)
    org = world.emulator.state()["organizations"][0]
    active = sorted((u for u in org["users"] if u["active"]), key=lambda u: u["id"])
    limit = max(10, int(0.2 * len(active)))  # role_mappings.yaml: threshold 0.2, min_users 10
    cursor = None
    for run in range(5):  # five runs of three deletions: each small, together past the limit
        results = world.emulator.mutate([{"op": "delete_user", "user_id": u["id"]}
                                         for u in active[run * 3:run * 3 + 3]])
        wait_for_inbox({e for r in results for e in r["event_ids"]})
        cursor = apply_webhooks(cursor)
    shown = {u["user_id"] for u in world.app_state()["users"]}
    gone = [u for u in active[:15] if u["id"] not in shown]
    held = query("SELECT entity_key, hold_reason FROM change_sets WHERE status = 'held' AND op = 'delete'")
    assert 0 < len(gone) <= limit and len(gone) + len(held) == 15
    assert set(held.hold_reason) == {"mass deprovisioning guard"}

    assert main(["approve", "--org", org["id"]]) == 0
    deliver = defs.resolve_job_def("deliver_changes")
    assert deliver.execute_in_process(instance=dagster_instance()).success
    assert world.differences() == []
