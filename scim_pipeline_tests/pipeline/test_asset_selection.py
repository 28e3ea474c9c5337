"""Each provisioning asset can be materialized alone, and ``delivered_state`` has one owner."""

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg

from scim_pipeline.commands import query, run_sync
from scim_pipeline.definitions import defs
from scim_pipeline.defs.instance import dagster_instance

PROVISIONING = ["group_memberships", "role_assignments", "directory_users_history", "change_sets"]


def _materialized_keys(instance: dg.DagsterInstance, run_id: str) -> set[str]:
    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION).records
    return {r.event_log_entry.dagster_event.asset_key.to_user_string() for r in records}


def test_the_cli_materializes_role_assignments_alone(world):
    run_sync(say=lambda _: None)
    org = world.org_ids()[0]
    roles_before = query(f"SELECT count(*) AS n FROM role_assignments WHERE organization_id = '{org}'").n[0]
    query_changes = "SELECT count(*) AS n FROM change_sets"
    changes_before = query(query_changes).n[0]
    instance = dagster_instance()
    runs_before = {r.run_id for r in instance.get_runs()}

    done = subprocess.run(
        [str(Path(sys.executable).with_name("dagster")), "asset", "materialize", "-m", "scim_pipeline.definitions",
         "--select", "role_assignments", "--partition", org],
        env=os.environ.copy(), capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    instance = dagster_instance()
    new_runs = [r for r in instance.get_runs() if r.run_id not in runs_before]
    assert len(new_runs) == 1
    assert _materialized_keys(instance, new_runs[0].run_id) == {"role_assignments"}
    # Roles were derived again from the memberships as they are; nothing else was touched.
    assert query(f"SELECT count(*) AS n FROM role_assignments WHERE organization_id = '{org}'").n[0] == roles_before
    assert query(query_changes).n[0] == changes_before


def test_any_one_provisioning_asset_materializes_alone_in_process(world):
    run_sync(say=lambda _: None)
    org = world.org_ids()[-1]
    instance = dagster_instance()
    for key in PROVISIONING:
        job = defs.resolve_implicit_global_asset_job_def().get_subset(asset_selection={dg.AssetKey(key)})
        result = job.execute_in_process(instance=instance, partition_key=org)
        assert result.success, key
        assert _materialized_keys(instance, result.run_id) == {key}, key


def test_only_the_asset_materializes_delivered_state(world):
    run_sync(say=lambda _: None)  # its delivery run is the deliver_changes job
    instance = dagster_instance()
    records = instance.fetch_materializations(dg.AssetKey("delivered_state"), limit=100).records
    assert records == []  # the sync delivered through the delivery job, which only observes the asset
    observed = instance.fetch_observations(dg.AssetKey("delivered_state"), limit=100).records
    assert {r.partition_key for r in observed} == set(world.org_ids())
