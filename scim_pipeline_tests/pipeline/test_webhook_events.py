"""The incremental path without the daemon: webhooks through the real receiver into the inbox, the webhook
sensor's run requests executed here, then delivery. Duplicates, reordering and late replays end in the truth."""

import json
import time

import dagster as dg
import httpx
import pytest

from scim_pipeline.devstack import services
from scim_pipeline.commands import query, run_sync
from scim_pipeline.defs.instance import dagster_instance
from scim_pipeline.config import settings
from scim_pipeline.defs.webhooks.sensor import webhook_events_sensor
from scim_pipeline.definitions import defs
from scim_pipeline.receiver.inbox import Inbox
from scim_pipeline.receiver.signature import signed_headers


def start_receiver(world):
    receiver = services.start("webhooks", [], world.home, ready=lambda s: services.port_open("127.0.0.1", s.port))
    world.emulator.set_webhook_url(f"{receiver.url}/webhooks/scalekit")
    return receiver


def wait_for_inbox(event_ids: set[str], timeout: float = 30) -> None:
    inbox = Inbox(settings().inbox_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if event_ids <= {e.event_id for e in inbox.read_after(0, 100_000)}:
            return
        time.sleep(0.1)
    raise AssertionError("the events did not all reach the inbox")


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


def test_duplicated_reordered_and_delayed_events_end_in_the_directory_truth(world):
    receiver = start_receiver(world)
    try:
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
    finally:
        receiver.stop()


def test_a_late_update_never_brings_back_a_deleted_user(world):
    receiver = start_receiver(world)
    try:
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
                            headers={**signed_headers(secret, "msg_late_1", body), "content-type": "application/json"})
        assert answer.status_code == 200
        apply_webhooks(cursor)

        row = query(f"SELECT given_name, deleted_at FROM directory_users WHERE user_id = '{leaver['id']}'")
        assert row.deleted_at[0] == deleted_at and row.given_name[0] != "Back"
        assert query("SELECT outcome FROM webhook_events WHERE event_id = 'evt_late_1'").outcome[0] == "stale"
        assert leaver["id"] not in {u["user_id"] for u in world.app_state()["users"]}
    finally:
        receiver.stop()


def test_a_disabled_directory_stops_delivery_until_it_is_enabled_again(world):
    receiver = start_receiver(world)
    try:
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
    finally:
        receiver.stop()


@pytest.mark.world(orgs=1, users_per_org=60)
def test_deletions_spread_over_webhook_runs_are_held_once_they_add_up_past_the_guard(world):
    from scim_pipeline.cli import main

    receiver = start_receiver(world)
    try:
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
    finally:
        receiver.stop()
