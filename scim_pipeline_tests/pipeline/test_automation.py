"""Sensors and schedules produce the right run requests (real sensor and schedule contexts)."""

import datetime as dt
import json
import uuid

import dagster as dg
import pytest
from scalekit.v1.directories.directories_pb2 import CreateDirectory, DirectoryProvider, DirectoryType
from scalekit.v1.organizations.organizations_pb2 import CreateOrganization

from scim_pipeline.config import ConfigError, settings
from scim_pipeline.defs.directory.automation import (
    RANGE_END,
    RANGE_START,
    discover_organizations,
    listing_nice,
    partition_ranges,
    reconciliation_schedule,
)
from scim_pipeline.defs.partitions import organizations_partitions
from scim_pipeline.defs.provisioning.delivery import delivery_sensor
from scim_pipeline.defs.resources import ScalekitResource
from scim_pipeline.defs.webhooks.sensor import webhook_events_sensor
from scim_pipeline.provisioning.outbox_index import OutboxIndex
from scim_pipeline.receiver.inbox import Inbox
from scim_pipeline_tests.emulator_support import emulator_fixture

emulator = emulator_fixture(seed=9, orgs=3, users_per_org=5, groups_per_org=2)


def test_discovery_adds_each_new_organization_and_launches_its_first_sync(emulator):
    instance = dg.DagsterInstance.ephemeral()
    orgs = sorted(o["id"] for o in emulator.state()["organizations"])
    with dg.build_sensor_context(instance=instance, resources={"scalekit": ScalekitResource()}) as context:
        result = discover_organizations(context)
    first_syncs = sorted(r.partition_key for r in result.run_requests if r.job_name == "directory_sync")
    assert first_syncs == orgs
    assert [r.job_name for r in result.run_requests].count("directory_catalog") == 1
    assert sorted(result.dynamic_partitions_requests[0].partition_keys) == orgs

    instance.add_dynamic_partitions(organizations_partitions.name, orgs)
    with dg.build_sensor_context(instance=instance, cursor=result.cursor,
                                 resources={"scalekit": ScalekitResource()}) as context:
        again = discover_organizations(context)
    assert again.run_requests == [] and again.dynamic_partitions_requests == []

    # A directory switched off changes the catalogue: refresh it, but no first sync.
    directory = emulator.state()["organizations"][0]["directories"][0]["id"]
    emulator.mutate([{"op": "disable_directory", "directory_id": directory}])
    with dg.build_sensor_context(instance=instance, cursor=again.cursor,
                                 resources={"scalekit": ScalekitResource()}) as context:
        changed = discover_organizations(context)
    assert [r.job_name for r in changed.run_requests] == ["directory_catalog"]


def test_discovery_finds_new_organizations_created_through_the_sdk_and_syncs_deleted_ones(emulator):
    instance = dg.DagsterInstance.ephemeral()
    orgs = sorted(o["id"] for o in emulator.state()["organizations"])
    instance.add_dynamic_partitions(organizations_partitions.name, orgs)
    client = emulator.client()

    def tick(cursor=None):
        with dg.build_sensor_context(instance=instance, cursor=cursor,
                                     resources={"scalekit": ScalekitResource()}) as context:
            return discover_organizations(context)

    # Onboarding: an organization without a directory is not synced yet; with an enabled directory it is.
    first = tick()  # no earlier cursor: nothing counts as newly enabled, nothing is resynced
    assert [r.job_name for r in first.run_requests] == ["directory_catalog"]
    new = client.organization.create_organization(CreateOrganization(display_name="Hooli"))[0].organization
    waiting = tick(first.cursor)
    assert [r.job_name for r in waiting.run_requests] == ["directory_catalog"]
    assert not waiting.dynamic_partitions_requests
    directory = client.directory.create_directory(new.id, CreateDirectory(
        directory_provider=DirectoryProvider.GOOGLE, directory_type=DirectoryType.SCIM))[0].directory
    onboarded = tick(waiting.cursor)
    assert [(r.job_name, r.partition_key) for r in onboarded.run_requests] == [
        ("directory_catalog", None), ("directory_sync", new.id)]
    assert onboarded.dynamic_partitions_requests[0].partition_keys == [new.id]
    instance.add_dynamic_partitions(organizations_partitions.name, [new.id])  # as the daemon does with the request

    # Switched off, then on again: the organization is listed whole (what it holds may never have come as events).
    client.directory.disable_directory(new.id, directory.id)
    off = tick(onboarded.cursor)
    assert [r.job_name for r in off.run_requests] == ["directory_catalog"]
    client.directory.enable_directory(new.id, directory.id)
    on = tick(off.cursor)
    assert [(r.job_name, r.partition_key, r.tags.get("scim_pipeline/trigger")) for r in on.run_requests] == [
        ("directory_catalog", None, None), ("directory_sync", new.id, "directory enabled")]

    # A deleted organization (no webhook tells) gets a full sync, which deprovisions its users through the guard.
    client.organization.delete_organization(orgs[0])
    deleted = tick(on.cursor)
    syncs = [r for r in deleted.run_requests if r.job_name == "directory_sync"]
    assert [(r.partition_key, r.tags["scim_pipeline/trigger"]) for r in syncs] == [(orgs[0], "organization deleted")]
    assert tick(deleted.cursor).run_requests == []  # once per catalogue


def test_discovery_skips_with_the_reason_when_scalekit_is_unreachable(home, monkeypatch):
    monkeypatch.setenv("SCALEKIT_ENVIRONMENT_URL", "https://localhost:9")
    monkeypatch.setenv("SCALEKIT_CLIENT_ID", "skc_1")
    monkeypatch.setenv("SCALEKIT_CLIENT_SECRET", "x")
    with dg.build_sensor_context(instance=dg.DagsterInstance.ephemeral(),
                                 resources={"scalekit": ScalekitResource()}) as context:
        result = discover_organizations(context)
    assert isinstance(result, dg.SkipReason) and "unreachable" in result.skip_message


def test_reconciliation_covers_every_organization_in_batched_single_runs(home, monkeypatch):
    monkeypatch.setenv("SCIM_PIPELINE_ORGS_PER_RUN", "50")
    with dg.instance_for_test() as instance:
        context = dg.build_schedule_context(instance=instance, scheduled_execution_time=dt.datetime(2026, 11, 28, 3))
        assert isinstance(reconciliation_schedule(context), dg.SkipReason)
        keys = [f"org_{i:04d}" for i in range(120)]
        instance.add_dynamic_partitions(organizations_partitions.name, keys)
        requests = reconciliation_schedule(context)
    assert [(r.tags[RANGE_START], r.tags[RANGE_END]) for r in requests] == [
        ("org_0000", "org_0049"), ("org_0050", "org_0099"), ("org_0100", "org_0119")]
    assert len({r.run_key for r in requests}) == 3


def test_a_reconciliation_still_running_is_not_joined_by_the_next(home):
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(organizations_partitions.name, ["org_0001", "org_0002"])
        context = dg.build_schedule_context(instance=instance, scheduled_execution_time=dt.datetime(2026, 11, 28, 3))
        started = dg.DagsterRunStatus.STARTED
        running = instance.add_run(dg.DagsterRun(job_name="directory_sync", run_id=str(uuid.uuid4()), status=started,
                                                 tags={"scim_pipeline/trigger": "reconciliation"}))
        # A first sync of a new organization (discovery) does not hold a reconciliation back.
        instance.add_run(dg.DagsterRun(job_name="directory_sync", run_id=str(uuid.uuid4()), status=started,
                                       tags={"scim_pipeline/trigger": "discovery"}))
        skipped = reconciliation_schedule(context)
        assert isinstance(skipped, dg.SkipReason) and running.run_id in skipped.skip_message
        instance.report_run_failed(running, "its process died")
        requests = reconciliation_schedule(context)
    assert len(requests) == 1 and requests[0].tags["scim_pipeline/trigger"] == "reconciliation"


def test_a_reconciliations_listing_gives_way_on_the_cpu_and_no_other_runs(monkeypatch):
    def run(trigger: str) -> dg.DagsterRun:
        return dg.DagsterRun(job_name="directory_sync", tags={"scim_pipeline/trigger": trigger})

    assert listing_nice(run("reconciliation")) == 10
    assert listing_nice(run("discovery")) == listing_nice(run("webhook")) == 0
    monkeypatch.setenv("SCIM_PIPELINE_RECONCILE_NICE", "0")
    assert listing_nice(run("reconciliation")) == 0
    for bad in ("20", "-1", "low"):
        monkeypatch.setenv("SCIM_PIPELINE_RECONCILE_NICE", bad)
        with pytest.raises(ConfigError, match="SCIM_PIPELINE_RECONCILE_NICE is malformed"):
            listing_nice(run("reconciliation"))


def test_webhook_sensor_groups_new_events_by_organization(home):
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(organizations_partitions.name, ["org_a"])
    with Inbox(settings().inbox_path) as inbox:
        for i, org in enumerate(["org_a", "org_b", "org_a"]):
            body = ('{"id": "evt_%d", "type": "organization.directory.user_updated", "organization_id": "%s", '
                    '"occurred_at": "2026-11-28T00:00:0%dZ", "data": {"id": "diruser_%d"}}') % (i, org, i, i)
            inbox.put(f"msg_{i}", body)
    with dg.build_sensor_context(instance=instance) as context:
        result = webhook_events_sensor(context)
    by_org = {r.partition_key: r for r in result.run_requests}
    assert set(by_org) == {"org_a", "org_b"}
    assert by_org["org_a"].run_config["ops"]["directory_snapshot"]["config"] == {
        "mode": "events", "after_seq": 0, "up_to_seq": 3}
    assert by_org["org_b"].run_config in (None, {})  # a new organization gets a full first sync
    assert result.dynamic_partitions_requests[0].partition_keys == ["org_b"]
    assert result.cursor == "3"
    with dg.build_sensor_context(instance=instance, cursor=result.cursor) as context:
        assert isinstance(webhook_events_sensor(context), dg.SkipReason)


def test_delivery_sensor_launches_one_run_for_the_due_organizations(home):
    instance = dg.DagsterInstance.ephemeral()
    with dg.build_sensor_context(instance=instance) as context:
        assert isinstance(delivery_sensor(context), dg.SkipReason)
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    index = OutboxIndex(settings().outbox_index_path)
    index.mark_ready(["org_a", "org_b"], now - dt.timedelta(seconds=1))
    index.mark_ready(["org_c"], now + dt.timedelta(hours=1))  # a retry whose backoff has not passed
    with dg.build_sensor_context(instance=instance) as context:
        request = delivery_sensor(context)
    assert request.run_config["ops"]["deliver"]["config"]["organizations"] == ["org_a", "org_b"]


def test_partition_ranges_cover_the_wanted_keys_in_contiguous_runs_of_bounded_size():
    keys = ["a", "b", "c", "d", "e", "f", "g"]
    assert partition_ranges(keys, None, 3) == [("a", "c"), ("d", "f"), ("g", "g")]
    assert partition_ranges(keys, {"a", "b", "d", "e", "f", "g"}, 2) == [("a", "b"), ("d", "e"), ("f", "g")]
    assert partition_ranges(keys, {"c"}, 50) == [("c", "c")]
    assert partition_ranges(keys, set(), 50) == []


def test_webhook_sensor_names_partitions_and_run_keys_only_with_organization_ids(home):
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(organizations_partitions.name, ["org_a"])
    strange = ["org_a\nb", "org_...", "...", "../canary", "org_a/../../x", "org_" + "1" * 40, 12345, None, ["org_a"]]
    with Inbox(settings().inbox_path) as inbox:
        for i, org in enumerate([*strange, "org_a"]):
            envelope = {"id": f"evt_{i}", "type": "organization.directory.user_updated",
                        "occurred_at": "2026-11-28T00:00:00Z", "data": {"id": f"diruser_{i}"}}
            if org is not None:
                envelope["organization_id"] = org
            inbox.put(f"msg_{i}", json.dumps(envelope))
    with dg.build_sensor_context(instance=instance) as context:
        result = webhook_events_sensor(context)
    by_job = {r.job_name: r for r in result.run_requests}
    assert [r.partition_key for r in result.run_requests if r.partition_key] == ["org_a"]
    assert not result.dynamic_partitions_requests
    assert all("\n" not in r.run_key and "/" not in r.run_key for r in result.run_requests)
    # The events naming no organization are recorded as invalid by a run of their own.
    assert set(by_job) == {"directory_events", "quarantine_webhook_events"}
    assert result.cursor == str(len(strange) + 1)


def test_webhook_sensor_asks_again_for_events_no_run_applied(home, monkeypatch):
    from scim_pipeline.definitions import defs
    from scim_pipeline.defs.webhooks.sensor import RETRY_VAR

    monkeypatch.setenv(RETRY_VAR, "0")
    with Inbox(settings().inbox_path) as inbox:
        for i, org in enumerate(["org_a", "../x", "org_a"]):
            inbox.put(f"msg_{i}", json.dumps({"id": f"evt_{i}", "organization_id": org}))
    with dg.instance_for_test() as instance:  # entered: the quarantine job below loads the definitions on it
        instance.add_dynamic_partitions(organizations_partitions.name, ["org_a"])

        def tick(cursor):
            with dg.build_sensor_context(instance=instance, cursor=cursor) as context:
                return webhook_events_sensor(context)

        first = tick(None)
        assert sorted(r.run_key for r in first.run_requests) == ["events:org_a:3", "quarantine:3"]
        # Neither run happened (or both failed): the next tick asks for both again, under new keys.
        again = tick(first.cursor)
        assert sorted((r.job_name, r.partition_key) for r in again.run_requests) == [
            ("directory_events", "org_a"), ("quarantine_webhook_events", None)]
        assert not {r.run_key for r in again.run_requests} & {r.run_key for r in first.run_requests}

        quarantine = next(r for r in again.run_requests if r.job_name == "quarantine_webhook_events")
        assert defs.resolve_job_def(quarantine.job_name).execute_in_process(
            instance=instance, run_config=quarantine.run_config).success
        assert [r.partition_key for r in tick(first.cursor).run_requests] == ["org_a"]
        Inbox(settings().inbox_path).mark_applied({"org_a": 3})  # what org_a's run does once it has applied them
        assert isinstance(tick(first.cursor), dg.SkipReason)
