
from scim_pipeline.definitions import defs


def test_definitions_load_with_every_job_sensor_and_schedule():
    repo = defs.get_repository_def()
    assert {j.name for j in repo.get_all_jobs()} >= {"directory_catalog", "directory_sync", "directory_events", "deliver_changes"}
    assert {s.name for s in repo.sensor_defs} == {"discover_organizations", "webhook_events_sensor", "delivery_sensor", "dead_run_reaper"}
    assert {s.name for s in repo.schedule_defs} == {"reconciliation_schedule"}
    graph = defs.resolve_asset_graph()
    assert {k.to_user_string() for k in graph.get_all_asset_keys()} == {
        "organizations", "directories", "directory_users", "directory_groups", "group_memberships",
        "role_assignments", "directory_users_history", "change_sets", "delivered_state",
    }
    # every warehouse writer takes the pool of one (DuckDB admits one writing process): the catalogue for its step;
    # the synced and derived assets per write (PoolTurns), declaring no pool; delivery never: it talks to the
    # application for seconds and writes in short transactions that wait for the file's lock instead
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assert node.pools == ({"warehouse"} if key.to_user_string() in {"organizations", "directories"} else set()), key
