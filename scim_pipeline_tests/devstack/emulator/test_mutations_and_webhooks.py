"""Mutations change the truth that the SDK reads, all-or-nothing, and each emits Scalekit's webhook events, signed
with Standard Webhooks headers and retried when the endpoint fails."""

import json
import time

import pytest
from standardwebhooks import Webhook

from scim_pipeline_tests.devstack.emulator.sdk_reader import snapshot
from scim_pipeline_tests.emulator_support import MutationRejected, RunningEmulator

ENVELOPE_KEYS = {"spec_version", "id", "type", "occurred_at", "environment_id", "organization_id", "object", "data",
                 "display_name"}


def _verified(emulator, received):
    """Every delivery verifies with the emulator's secret; returns the events in arrival order."""
    webhook = Webhook(emulator.env["SCALEKIT_WEBHOOK_SECRET"])
    events = []
    for headers, body in received:
        event = webhook.verify(body, {k: headers[k] for k in ("webhook-id", "webhook-timestamp", "webhook-signature")})
        assert headers["webhook-id"].startswith("msg_")
        assert set(event) == ENVELOPE_KEYS
        assert event["id"].startswith("evt_") and event["occurred_at"].endswith("Z")
        events.append(event)
    return events


def _org(emulator):
    return emulator.state()["organizations"][0]


def test_mutations_change_the_truth_and_send_signed_events(emulator, receiver):
    emulator.set_webhook_url(receiver.url)
    org = _org(emulator)
    d = org["directories"][0]
    groups = [g for g in org["groups"] if g["directory_id"] == d["id"]]
    alice = next(u for u in org["users"] if u["active"] and u["directory_id"] == d["id"])

    results = emulator.mutate([
        {"op": "create_user", "organization_id": org["id"],
         "user": {"email": "new.hire@example.com", "given_name": "New", "family_name": "Hire", "title": "Engineer"},
         "groups": [groups[0]["id"]]},
        {"op": "update_user", "user_id": alice["id"], "changes": {"family_name": "Married"}},
        {"op": "deactivate_user", "user_id": alice["id"]},
        {"op": "create_group", "organization_id": org["id"], "display_name": "Emulator Testers"},
    ])
    new_id, group_id = results[0]["id"], results[3]["id"]
    assert new_id.startswith("diruser_") and group_id.startswith("dirgroup_")
    assert [r["op"] for r in results] == ["create_user", "update_user", "deactivate_user", "create_group"]
    results += emulator.mutate([
        {"op": "add_member", "group_id": group_id, "user_id": new_id},
        {"op": "rename_group", "group_id": group_id, "display_name": "QA Guild"},
        {"op": "remove_member", "group_id": groups[0]["id"], "user_id": new_id},
        {"op": "reactivate_user", "user_id": alice["id"]},
        {"op": "delete_user", "user_id": alice["id"]},
    ])
    expected_ids = [i for r in results for i in r["event_ids"]]
    assert len(expected_ids) == 9

    truth = emulator.state()
    org_after = truth["organizations"][0]
    new = next(u for u in org_after["users"] if u["id"] == new_id)
    assert new["email"] == "new.hire@example.com" and new["active"] is True
    assert new["groups"] == [{"id": group_id, "name": "QA Guild"}]
    assert alice["id"] not in {u["id"] for u in org_after["users"]}
    assert {"id": group_id, "directory_id": d["id"], "display_name": "QA Guild"} in org_after["groups"]
    assert snapshot(emulator.client()) == truth  # the SDK sees the new truth

    events = _verified(emulator, receiver.wait_for(9))
    assert [e["id"] for e in events] == expected_ids
    assert [e["type"] for e in events] == [
        "organization.directory.user_created", "organization.directory.user_updated",
        "organization.directory.user_updated", "organization.directory.group_created",
        "organization.directory.user_updated", "organization.directory.group_updated",
        "organization.directory.user_updated", "organization.directory.user_updated",
        "organization.directory.user_deleted",
    ]
    created = events[0]
    assert created["object"] == "DirectoryUser" and created["organization_id"] == org["id"]
    assert created["data"]["email"] == "new.hire@example.com" and created["data"]["active"] is True
    assert created["data"]["groups"] == [{"id": groups[0]["id"], "name": groups[0]["display_name"]}]
    # as Scalekit's: no directory_id, no emails list, raw_attributes empty (test_documented_payloads holds the rest)
    assert "directory_id" not in created["data"] and "emails" not in created["data"]
    assert created["data"]["raw_attributes"] == {}
    assert events[2]["data"]["active"] is False and events[2]["data"]["family_name"] == "Married"
    assert events[5]["data"]["display_name"] == "QA Guild"
    assert events[8]["data"]["id"] == alice["id"]
    times = [e["occurred_at"] for e in events]
    assert times == sorted(times)


def test_deleting_a_group_updates_each_member(emulator, receiver):
    emulator.set_webhook_url(receiver.url)
    org = _org(emulator)
    members = {}
    for u in org["users"]:
        for g in u["groups"]:
            members.setdefault(g["id"], []).append(u["id"])
    group_id, member_ids = max(members.items(), key=lambda kv: len(kv[1]))
    assert len(member_ids) >= 2
    results = emulator.mutate([{"op": "delete_group", "group_id": group_id}])
    events = _verified(emulator, receiver.wait_for(1 + len(member_ids)))
    assert events[0]["type"] == "organization.directory.group_deleted" and events[0]["data"]["id"] == group_id
    updated = [e for e in events[1:] if e["type"] == "organization.directory.user_updated"]
    assert sorted(e["data"]["id"] for e in updated) == sorted(member_ids)
    assert all(group_id not in [g["id"] for g in e["data"]["groups"]] for e in updated)
    assert len(results[0]["event_ids"]) == 1 + len(member_ids)
    truth = emulator.state()["organizations"][0]
    assert group_id not in {g["id"] for g in truth["groups"]}
    assert all(group_id not in [g["id"] for g in u["groups"]] for u in truth["users"])
    assert all(a["group_id"] != group_id for d in truth["directories"] for a in d["role_assignments"])


def test_invalid_mutation_is_refused_whole(emulator, receiver):
    emulator.set_webhook_url(receiver.url)
    before = emulator.state()
    org = before["organizations"][0]
    user = org["users"][0]
    bad_batches = [
        [{"op": "deactivate_user", "user_id": user["id"]}, {"op": "delete_user", "user_id": "diruser_404"}],
        [{"op": "create_group", "organization_id": org["id"], "display_name": "Fresh"},
         {"op": "add_member", "group_id": "dirgroup_1", "user_id": user["id"]}],
        [{"op": "delete_group", "group_id": org["groups"][0]["id"]}, {"op": "launch_rockets"}],
        [{"op": "update_user", "user_id": user["id"], "changes": {"shoe_size": 44}}],
        [{"op": "create_user", "organization_id": "org_404", "user": {"email": "x@example.com"}}],
    ]
    for index, batch in enumerate(bad_batches):
        with pytest.raises(MutationRejected) as err:
            emulator.mutate(batch)
        assert f"mutation {len(batch) - 1} ({batch[-1]['op']})" in str(err.value)
        assert emulator.state() == before, f"batch {index} left changes behind"
    response = emulator.control("POST", "/_emulator/mutations", content=b"{not json")
    assert response.status_code == 400
    time.sleep(0.3)
    assert receiver.received == []
    assert emulator.events() == []


def test_failing_endpoint_gets_retries(home, receiver):
    receiver.status = 503
    # Scalekit waits 5 s before the first retry and 5 min before the second; scaled by 100: 50 ms, 3 s.
    with RunningEmulator(home, orgs=1, users_per_org=5, groups_per_org=2, retry_time_scale=100,
                         webhook_url=receiver.url) as emu:
        user = emu.state()["organizations"][0]["users"][0]
        emu.mutate([{"op": "update_user", "user_id": user["id"], "changes": {"title": "Boss"}}])
        attempts = receiver.wait_for(2, timeout=10)
        assert len(attempts) == 2
        receiver.status = 200
        attempts = receiver.wait_for(3, timeout=10)
        assert len(attempts) == 3
        ids = {h["webhook-id"] for h, _ in attempts}
        assert len(ids) == 1  # the same message, retried
        _verified(emu, attempts)
        # The sender counts an attempt once its answer is back, a moment after the receiver has the request.
        deadline = time.monotonic() + 5
        while (status := emu.webhook_status())["delivered"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert status["delivered"] == 1 and status["failed_attempts"] == 2


def test_webhook_faults_drop_and_duplicate(emulator, receiver):
    emulator.set_webhook_url(receiver.url)
    user = _org(emulator)["users"][0]
    emulator.faults(webhook_duplicate_rate=1.0)
    emulator.mutate([{"op": "update_user", "user_id": user["id"], "changes": {"title": "Twice"}}])
    received = receiver.wait_for(2)
    assert len(received) == 2 and received[0][0]["webhook-id"] == received[1][0]["webhook-id"]
    emulator.faults(webhook_duplicate_rate=0, webhook_drop_rate=1.0)
    emulator.mutate([{"op": "update_user", "user_id": user["id"], "changes": {"title": "Never"}}])
    emulator.faults(webhook_drop_rate=0, webhook_reorder_window=3)
    results = emulator.mutate([{"op": "update_user", "user_id": user["id"], "changes": {"title": f"T{i}"}}
                               for i in range(3)])
    received = receiver.wait_for(5)
    assert len(received) == 5
    late = [json.loads(body)["id"] for _, body in received[2:]]
    assert sorted(late) == sorted(i for r in results for i in r["event_ids"])
    assert emulator.webhook_status()["dropped"] == 1


def test_webhook_delay_fault_holds_each_event_back(emulator, receiver):
    emulator.set_webhook_url(receiver.url)
    user = _org(emulator)["users"][0]
    emulator.faults(webhook_delay_ms=1500)
    started = time.monotonic()
    emulator.mutate([{"op": "update_user", "user_id": user["id"], "changes": {"title": "Later"}}])
    assert receiver.wait_for(1, timeout=1.0) == []  # not before the delay
    assert len(receiver.wait_for(1, timeout=10)) == 1
    assert time.monotonic() - started >= 1.5


def test_directory_can_be_disabled_and_enabled(emulator, receiver, client):
    emulator.set_webhook_url(receiver.url)
    org = _org(emulator)
    d = org["directories"][0]
    emulator.mutate([{"op": "disable_directory", "directory_id": d["id"]}])
    assert emulator.state()["organizations"][0]["directories"][0]["enabled"] is False
    client.directory.enable_directory(org["id"], d["id"])  # the SDK's own call
    assert client.directory.get_directory(org["id"], d["id"])[0].directory.enabled
    events = _verified(emulator, receiver.wait_for(2))
    assert [e["type"] for e in events] == ["organization.directory_disabled", "organization.directory_enabled"]
    assert events[0]["object"] == "Directory" and events[0]["data"]["id"] == d["id"]
    # The same events in Scalekit's event log, through the SDK's EventsClient.
    logged, _ = client.events.list_events_paginated(page_size=10)
    assert [e.id for e in logged.events] == [e["id"] for e in events]
    assert logged.events[0].data["id"] == d["id"]
