"""The real-time path with every real part: emulator -> signed webhook -> receiver -> inbox -> webhook sensor (in
the Dagster daemon) -> incremental run -> change sets -> delivery sensor -> delivery run -> demo application."""

import os
import subprocess
import time

import dagster as dg
import pytest

from scim_pipeline.commands import query, run_sync
from scim_pipeline.config import settings
from scim_pipeline.defs import run_process
from scim_pipeline.devstack.convergence import differences
from scim_pipeline.devstack.stack import Stack
from scim_pipeline.provisioning.role_mapping import load_role_mapping
from scim_pipeline_tests.emulator_support import _seed_tls


@pytest.fixture
def stack(home, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster"))
    saved = dict(os.environ)
    _seed_tls(home)  # one CA per test process: gRPC caches its roots
    stack = Stack(home)
    try:
        yield stack
    finally:
        stack.stop()
        os.environ.clear()
        os.environ.update(saved)


def wait_for(predicate, timeout: float, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"not true within {timeout}s")


def test_a_leaver_reaches_the_application_through_the_daemon(stack):
    stack.start_emulator("--seed", "4", "--orgs", "2", "--users-per-org", "20", "--groups-per-org", "4",
                         "--retry-time-scale", "60")
    stack.start_receiver()
    stack.start_app()
    run_sync(say=lambda _: None)
    stack.start_daemon()
    instance = dg.DagsterInstance.get()
    # Dagster's run monitoring runs in the daemon (start and cancel timeouts, slots of ended runs freed).
    wait_for(lambda: "MONITORING" in instance.get_daemon_heartbeats(), 60)

    org = stack.truth()["organizations"][0]
    leaver = next(u for u in org["users"] if u["active"])
    started = time.monotonic()
    stack.mutate([{"op": "deactivate_user", "user_id": leaver["id"]}])
    wait_for(lambda: any(u["user_id"] == leaver["id"] and not u["active"] for u in stack.app_state()["users"]), 90)
    latency = time.monotonic() - started
    print(f"webhook to application: {latency:.1f}s")

    mapping = load_role_mapping(settings().role_mappings_path())
    wait_for(lambda: not differences(stack.app_state(), stack.truth(), mapping), 30)
    events = query("SELECT type, outcome FROM webhook_events")
    assert ("organization.directory.user_updated", "applied") in set(map(tuple, events.values.tolist()))
    assert stack.app_stats()["max_applications"] == 1

    # The daemon (scim-pipeline daemon) evaluates sensors every second, not on Dagster's fixed 5 s loop: the webhook
    # sensor's ticks are about a second apart.
    state = next(s for s in instance.all_instigator_state() if s.name == "webhook_events_sensor")

    def eight_ticks():
        found = instance.get_ticks(state.instigator_origin_id, state.selector_id, limit=8)
        return sorted(t.timestamp for t in found) if len(found) == 8 else None

    ticks = wait_for(eight_ticks, 30)
    gaps = sorted(b - a for a, b in zip(ticks, ticks[1:]))
    assert gaps[len(gaps) // 2] < 2.5, gaps

    # Runs the daemon launched record their own process (the run worker's) and host, so the reaper can judge them.
    launched = [r.dagster_run for r in instance.get_run_records(dg.RunsFilter(job_name="directory_events"))]
    assert launched
    for run in launched:
        start = instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.RUN_START).records
        assert run.tags[run_process.HOST_TAG] == run_process.host()
        assert run.tags[run_process.PID_TAG] == str(start[0].event_log_entry.dagster_event.pid) != str(os.getpid())


def test_a_new_organization_is_onboarded_under_the_daemon(stack):
    from scalekit import ScalekitClient
    from scalekit.v1.directories.directories_pb2 import CreateDirectory, DirectoryProvider, DirectoryType
    from scalekit.v1.organizations.organizations_pb2 import CreateOrganization

    stack.start_emulator("--seed", "4", "--orgs", "0", "--retry-time-scale", "60")
    stack.start_receiver()
    stack.start_app()
    stack.start_daemon()  # no sync beforehand: the pipeline knows of no organization yet

    env = stack.emulator_env
    client = ScalekitClient(env["SCALEKIT_ENVIRONMENT_URL"], env["SCALEKIT_CLIENT_ID"], env["SCALEKIT_CLIENT_SECRET"])
    org = client.organization.create_organization(CreateOrganization(display_name="Pied Piper",
                                                                     external_id="tenant-7"))[0].organization
    directory = client.directory.create_directory(org.id, CreateDirectory(
        directory_provider=DirectoryProvider.OKTA, directory_type=DirectoryType.SCIM))[0].directory
    client.directory.disable_directory(org.id, directory.id)  # its admin is still setting it up
    group = stack.mutate([{"op": "create_group", "organization_id": org.id, "display_name": "Engineering"}])
    group_id = group["results"][0]["id"]
    hires = stack.mutate([{"op": "create_user", "organization_id": org.id, "groups": [group_id],
                           "user": {"active": True}} for _ in range(3)])
    users = {r["id"] for r in hires["results"]}

    started = time.monotonic()
    assert client.directory.enable_directory(org.id, directory.id)[0].enabled
    wait_for(lambda: users <= {u["user_id"] for u in stack.app_state()["users"]}, 90)
    latency = time.monotonic() - started
    print(f"directory enabled to first users in the application: {latency:.1f}s")
    assert latency < 60

    mapping = load_role_mapping(settings().role_mappings_path())
    wait_for(lambda: not differences(stack.app_state(), stack.truth(), mapping), 30)


def test_dev_runs_the_ui_beside_the_daemon_on_one_code_server_and_stops_them(stack):
    """``scim-pipeline dev``'s Dagster: the webserver answers and the daemon beats, both on the one code server,
    whose fork server (run processes start from it) has imported the code location; stopping the stack ends all
    three process groups."""
    import httpx

    from scim_pipeline.devstack.services import free_port

    port = free_port()
    stack.start_dagster(port)
    instance = dg.DagsterInstance.get()

    def answers() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/server_info", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(answers, 90, interval=0.5)
    assert "SENSOR" in instance.get_daemon_heartbeats() and stack.dagster_running()
    assert "grpc_server" in stack.workspace.read_text()
    children = subprocess.run(["ps", "-ww", "-o", "args=", "--ppid", str(stack.code_server.pid)], capture_output=True,
                              text=True).stdout
    assert "multiprocessing.forkserver" in children and "scim_pipeline.definitions" in children, children
    groups = [stack.dagster.pid, stack.webserver.pid, stack.code_server.pid]
    stack.stop()
    assert all(p.poll() is not None for p in (stack.dagster, stack.webserver, stack.code_server))

    def gone(group: int) -> bool:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return True
        return False

    for group in groups:  # a group's last processes (the fork server) leave moments after its leader
        wait_for(lambda: gone(group), 30)
