"""The Dagster UI tells the story of the pipeline.

One real ``dagster-webserver`` loads the code location from ``workspace.yaml``, as ``dagster dev`` does, and the
tests read what the UI shows through the webserver's own GraphQL API: asset groups, descriptions and lineage,
per-organization partitions, the data checks (the held-changes and dead-letter views among them), sensors, the
reconciliation schedule and the jobs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from scim_pipeline.defs.directory.automation import DEFAULT_RECONCILE_CRON, RECONCILE_CRON_VAR
from scim_pipeline.defs.instance import ensure_dagster_home
from scim_pipeline.devstack.services import free_port

PROJECT = Path(__file__).resolve().parents[2]
LOCATION = "scim_pipeline"  # as named in workspace.yaml
START_TIMEOUT_S = 90

ASSET_GROUPS = {
    "organizations": "directory",
    "directories": "directory",
    "directory_users": "directory",
    "directory_groups": "directory",
    "group_memberships": "provisioning",
    "role_assignments": "provisioning",
    "directory_users_history": "provisioning",
    "change_sets": "provisioning",
    "delivered_state": "provisioning",
}
# asset -> upstream assets the lineage graph must draw
LINEAGE = {
    "directories": {"organizations"},
    "directory_users": {"directories"},
    "directory_groups": {"directories"},
    "group_memberships": {"directory_users", "directory_groups"},
    "role_assignments": {"group_memberships", "directories"},
    "directory_users_history": {"role_assignments"},
    "change_sets": {"role_assignments", "group_memberships", "directory_users"},
    "delivered_state": {"change_sets"},
}
CATALOGUE = {"organizations", "directories"}  # one listing of the whole environment: not partitioned
PARTITIONED = set(ASSET_GROUPS) - CATALOGUE
CHECKS = {
    "directory_users": {"users_unique_ids", "users_emails_well_formed", "users_match_directory_totals"},
    "directory_groups": {"groups_unique_ids"},
    "group_memberships": {"memberships_point_at_live_rows"},
    "change_sets": {"held_changes", "dead_changes"},
}
SENSORS = {  # sensor -> the jobs it launches
    "discover_organizations": {"directory_catalog", "directory_sync"},
    "webhook_events_sensor": {"directory_events", "directory_sync", "quarantine_webhook_events"},
    "delivery_sensor": {"deliver_changes"},
    "dead_run_reaper": set(),
}
JOBS = {"directory_catalog", "directory_sync", "directory_events", "deliver_changes", "quarantine_webhook_events"}

# The variables the suite's `home` fixture clears, plus the schedule's cron override.
ISOLATED_VARS = (
    "SCALEKIT_ENVIRONMENT_URL", "SCALEKIT_CLIENT_ID", "SCALEKIT_CLIENT_SECRET", "SCALEKIT_WEBHOOK_SECRET",
    "SCIM_PIPELINE_APP_URL", "SCIM_PIPELINE_APP_SECRET", "SCIM_PIPELINE_ROLE_MAPPINGS", RECONCILE_CRON_VAR,
)

ASSET_NODES_QUERY = """
query AssetGraph {
  assetNodes {
    assetKey { path }
    description
    groupName
    isPartitioned
    isAutoCreatedStub
    dependencyKeys { path }
    dependedByKeys { path }
    partitionDefinition {
      type
      name
      dimensionTypes { name type dynamicPartitionsDefinitionName }
    }
    assetChecksOrError {
      __typename
      ... on AssetChecks { checks { name description jobNames assetKey { path } } }
    }
  }
}
"""

REPOSITORIES_QUERY = """
query Repositories {
  repositoriesOrError {
    __typename
    ... on RepositoryConnection {
      nodes {
        name
        location { name }
        assetGroups { groupName }
        jobs { name description }
        sensors { name description defaultStatus targets { pipelineName } }
        schedules { name description cronSchedule pipelineName defaultStatus }
      }
    }
    ... on PythonError { message }
  }
}
"""

WORKSPACE_QUERY = """
query Workspace {
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries {
        name
        loadStatus
        locationOrLoadError {
          __typename
          ... on PythonError { message }
        }
      }
    }
    ... on PythonError { message }
  }
}
"""


def graphql(client: httpx.Client, query: str, variables: dict | None = None) -> dict:
    response = client.post("/graphql", json={"query": query, "variables": variables or {}})
    response.raise_for_status()
    body = response.json()
    assert not body.get("errors"), body["errors"]
    return body["data"]


def _log_tail(log: Path, lines: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _wait_until_loaded(client: httpx.Client, proc: subprocess.Popen, log: Path) -> None:
    """Wait until the webserver answers and the code location is loaded (or failed to load), within the bound."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"dagster-webserver exited with {proc.returncode}:\n{_log_tail(log)}")
        try:
            if client.get("/server_info", timeout=2).status_code == 200:
                entries = graphql(client, WORKSPACE_QUERY)["workspaceOrError"]["locationEntries"]
                if entries and all(e["loadStatus"] == "LOADED" for e in entries):
                    return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"dagster-webserver not ready within {START_TIMEOUT_S} s:\n{_log_tail(log)}")
        time.sleep(0.25)


def _stop(proc: subprocess.Popen) -> None:
    """Stop the webserver and its code server: the process group this module started, and nothing else."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """A client of one real dagster-webserver on a fresh installation home, shared by the tests of this module.

    Module-scoped, so it sets up the same fresh home as the suite's (function-scoped) ``home`` fixture itself.
    """
    with pytest.MonkeyPatch.context() as mp:
        for var in ISOLATED_VARS:
            mp.delenv(var, raising=False)
        home = tmp_path_factory.mktemp("ui") / "home"
        home.mkdir()
        mp.setenv("SCIM_PIPELINE_HOME", str(home))
        mp.setenv("DAGSTER_HOME", str(home / "dagster"))
        ensure_dagster_home()  # the project's dagster.yaml in the fresh instance home
        assert (home / "dagster" / "dagster.yaml").exists()

        port = free_port()
        log = home / "webserver.log"
        webserver = Path(sys.executable).with_name("dagster-webserver")
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [str(webserver), "-h", "127.0.0.1", "-p", str(port), "-w", "workspace.yaml"],
                cwd=PROJECT, env=os.environ.copy(), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopping it also stops its code server
            )
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
                _wait_until_loaded(client, proc, log)
                yield client
        finally:
            _stop(proc)


@pytest.fixture(scope="module")
def asset_nodes(ui) -> dict[str, dict]:
    nodes = graphql(ui, ASSET_NODES_QUERY)["assetNodes"]
    return {"/".join(n["assetKey"]["path"]): n for n in nodes}


@pytest.fixture(scope="module")
def repository(ui) -> dict:
    result = graphql(ui, REPOSITORIES_QUERY)["repositoriesOrError"]
    assert result["__typename"] == "RepositoryConnection", result
    repos = [r for r in result["nodes"] if r["location"]["name"] == LOCATION]
    assert len(repos) == 1, result["nodes"]
    return repos[0]


def _keys(keys: list[dict]) -> set[str]:
    return {"/".join(k["path"]) for k in keys}


def test_webserver_serves_the_ui_and_loads_the_code_location(ui):
    page = ui.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    entries = graphql(ui, WORKSPACE_QUERY)["workspaceOrError"]["locationEntries"]
    assert [(e["name"], e["loadStatus"], e["locationOrLoadError"]["__typename"]) for e in entries] == [
        (LOCATION, "LOADED", "RepositoryLocation")
    ]


def test_every_asset_has_a_description_and_its_group(asset_nodes, repository):
    assert set(asset_nodes) == set(ASSET_GROUPS)
    for key, node in asset_nodes.items():
        assert (node["description"] or "").strip(), f"{key} has no description"
        assert node["groupName"] == ASSET_GROUPS[key], key
    assert {g["groupName"] for g in repository["assetGroups"]} == {"directory", "provisioning"}


def test_asset_graph_draws_the_lineage(asset_nodes):
    for key, upstream in LINEAGE.items():
        assert _keys(asset_nodes[key]["dependencyKeys"]) >= upstream, key
        for parent in upstream:
            assert key in _keys(asset_nodes[parent]["dependedByKeys"]), (parent, key)
    for key, node in asset_nodes.items():  # no dangling dependency drawn as a stub box
        assert not node["isAutoCreatedStub"], key
        assert _keys(node["dependencyKeys"]) <= set(ASSET_GROUPS), key


def test_assets_are_partitioned_per_organization(asset_nodes):
    for key in PARTITIONED:
        node = asset_nodes[key]
        assert node["isPartitioned"], key
        partitions = node["partitionDefinition"]
        assert partitions["type"] == "DYNAMIC", key
        assert partitions["name"] == "organizations", key
        assert [d["dynamicPartitionsDefinitionName"] for d in partitions["dimensionTypes"]] == ["organizations"], key
    for key in CATALOGUE:
        assert not asset_nodes[key]["isPartitioned"], key
        assert asset_nodes[key]["partitionDefinition"] is None, key


def test_checks_are_attached_to_their_assets(asset_nodes):
    for key, expected in CHECKS.items():
        checks_or_error = asset_nodes[key]["assetChecksOrError"]
        assert checks_or_error["__typename"] == "AssetChecks", (key, checks_or_error)
        checks = {c["name"]: c for c in checks_or_error["checks"]}
        assert set(checks) >= expected, key
        for name in expected:
            check = checks[name]
            assert _keys([check["assetKey"]]) == {key}
            assert (check["description"] or "").strip(), f"check {name} has no description"
            assert "directory_sync" in check["jobNames"], f"check {name} does not run with the sync"
    # the held-changes and dead-letter views of the change ledger
    checks = {c["name"]: c for c in asset_nodes["change_sets"]["assetChecksOrError"]["checks"]}
    assert "held" in checks["held_changes"]["description"].lower()
    assert "dead" in checks["dead_changes"]["description"].lower()


def test_sensors_schedule_and_jobs_are_described(repository):
    sensors = {s["name"]: s for s in repository["sensors"]}
    assert set(sensors) >= set(SENSORS)
    for name, job in SENSORS.items():
        sensor = sensors[name]
        assert (sensor["description"] or "").strip(), f"sensor {name} has no description"
        assert sensor["defaultStatus"] == "RUNNING", name
        targets = {t["pipelineName"] for t in sensor["targets"] or []}
        assert targets == job, name

    schedules = {s["name"]: s for s in repository["schedules"]}
    schedule = schedules["reconciliation_schedule"]
    assert (schedule["description"] or "").strip()
    assert schedule["pipelineName"] == "directory_sync"
    assert schedule["cronSchedule"] == DEFAULT_RECONCILE_CRON
    assert schedule["defaultStatus"] == "RUNNING"

    jobs = {j["name"]: j for j in repository["jobs"]}
    assert set(jobs) >= JOBS
    for name in JOBS:
        assert (jobs[name]["description"] or "").strip(), f"job {name} has no description"
