"""Directory sync into DuckDB and delivery to the application, end to end."""

import random

import pytest

from scim_pipeline.commands import SyncFailed, query, run_sync


def warehouse_users(org=None):
    frame = query("SELECT user_id, organization_id, directory_id, email, given_name, family_name, "
                  "preferred_username, active, deleted_at FROM directory_users")
    return {r.user_id: r for r in frame.itertuples()}


def test_full_sync_under_latency_and_rate_limits_matches_the_directory(world):
    world.emulator.faults(latency_ms=3, rate_limit_every=7)
    summary = run_sync(say=lambda _: None)
    truth = world.emulator.state()

    users = warehouse_users()
    truth_users = {u["id"]: (o["id"], u) for o in truth["organizations"] for u in o["users"]}
    assert set(users) == set(truth_users)
    for uid, (org, u) in truth_users.items():
        row = users[uid]
        assert (row.organization_id, row.directory_id, row.email, row.given_name, row.family_name,
                row.preferred_username, bool(row.active)) == (
            org, u["directory_id"], u["email"], u["given_name"], u["family_name"], u["preferred_username"],
            u["active"])
        assert row.deleted_at is None or str(row.deleted_at) == "NaT"
    groups = query("SELECT group_id, display_name FROM directory_groups WHERE deleted_at IS NULL")
    assert dict(zip(groups.group_id, groups.display_name)) == {
        g["id"]: g["display_name"] for o in truth["organizations"] for g in o["groups"]}
    memberships = query("SELECT organization_id, group_id, user_id FROM group_memberships")
    assert set(map(tuple, memberships.values.tolist())) == {
        (o["id"], g["id"], u["id"]) for o in truth["organizations"] for u in o["users"] for g in u["groups"]}

    assert summary["organizations"] == 3 and summary["users"] == len(truth_users)
    assert world.differences() == []
    assert world.app_stats()["max_applications"] == 1


def test_directory_changes_give_tombstones_history_and_a_converged_application(world):
    run_sync(say=lambda _: None)
    truth = world.emulator.state()
    org = truth["organizations"][0]
    rng = random.Random(5)
    users = sorted(org["users"], key=lambda u: u["id"])
    leaver, renamed, deactivated, mover = users[0], users[1], users[2], users[3]
    groups = sorted(org["groups"], key=lambda g: g["id"])
    results = world.emulator.mutate([
        {"op": "create_user", "organization_id": org["id"],
         "user": {"email": "new.hire@example.com", "given_name": "New", "family_name": "Hire"},
         "groups": [groups[0]["id"]]},
        {"op": "delete_user", "user_id": leaver["id"]},
        {"op": "update_user", "user_id": renamed["id"], "changes": {"family_name": "Renamed"}},
        {"op": "deactivate_user", "user_id": deactivated["id"]},
        {"op": "add_member", "group_id": groups[1]["id"], "user_id": mover["id"]},
        {"op": "rename_group", "group_id": groups[2]["id"], "display_name": "Platform Engineering"},
        {"op": "delete_group", "group_id": groups[3]["id"]},
    ])
    assert len(results) == 7
    rng.shuffle(users)
    run_sync(say=lambda _: None)

    rows = warehouse_users()
    assert rows[leaver["id"]].deleted_at is not None and str(rows[leaver["id"]].deleted_at) != "NaT"
    assert rows[renamed["id"]].family_name == "Renamed"
    deleted_group = query(f"SELECT deleted_at FROM directory_groups WHERE group_id = '{groups[3]['id']}'")
    assert deleted_group.deleted_at.notna().all()
    history = query(f"SELECT family_name, valid_from, valid_to FROM directory_users_history "
                    f"WHERE user_id = '{renamed['id']}' ORDER BY valid_from")
    assert list(history.family_name) == [renamed["family_name"], "Renamed"]
    assert history.valid_to.iloc[0] is not None and history.valid_to.isna().iloc[1]
    assert world.differences() == []
    app_users = {u["user_id"]: u for u in world.app_state()["users"]}
    assert leaver["id"] not in app_users and app_users[deactivated["id"]]["active"] is False
    assert world.app_stats()["max_applications"] == 1


@pytest.mark.world(app_args=["--fail-rate", "0.2", "--rate-limit-rate", "0.1"])
def test_application_failing_and_rate_limiting_converges_within_three_runs_without_double_applies(world):
    for attempt in range(3):
        run_sync(delivery_backoff_s=0, say=lambda _: None)
        if not world.differences():
            break
    assert world.differences() == []
    assert world.app_stats()["max_applications"] == 1


def test_mass_deactivation_is_held_until_approved(world, capsys):
    from scim_pipeline.cli import main

    run_sync(say=lambda _: None)
    org = world.emulator.state()["organizations"][0]
    leavers = [u for u in org["users"] if u["active"]][: int(len(org["users"]) * 0.4) + 1]
    assert len(leavers) > 10
    world.emulator.mutate([{"op": "deactivate_user", "user_id": u["id"]} for u in leavers])
    run_sync(say=lambda _: None)

    held = query(f"SELECT entity, op FROM change_sets WHERE organization_id = '{org['id']}' AND status = 'held'")
    assert (held.op == "deactivate").sum() == len(leavers)
    app_users = {u["user_id"]: u for u in world.app_state()["users"]}
    assert all(app_users[u["id"]]["active"] for u in leavers)  # nothing of it reached the application

    capsys.readouterr()
    assert main(["changes", "--org", org["id"], "--status", "held"]) == 0
    assert leavers[0]["id"] in capsys.readouterr().out
    assert main(["approve", "--org", org["id"]]) == 0
    assert f"released {len(held)}" in capsys.readouterr().out
    run_sync(say=lambda _: None)
    assert world.differences() == []


def test_an_organization_without_an_enabled_directory_is_skipped_and_the_others_sync(world):
    state = world.emulator.state()
    org = state["organizations"][0]
    world.emulator.mutate([{"op": "disable_directory", "directory_id": d["id"]} for d in org["directories"]])
    summary = run_sync(say=lambda _: None)
    synced = set(query("SELECT DISTINCT organization_id FROM directory_users").organization_id)
    assert synced == {o["id"] for o in state["organizations"][1:]}
    assert summary["organizations"] == 2


@pytest.mark.world(users_per_org=45)  # two pages of users an organization
def test_a_page_scalekit_cut_short_fails_its_organization_clearly_and_loses_nothing(world):
    run_sync(say=lambda _: None)
    state = world.emulator.state()
    renamed = {o["id"]: o["users"][0]["id"] for o in state["organizations"]}
    world.emulator.mutate([{"op": "update_user", "user_id": u, "changes": {"given_name": "Renamed"}}
                           for u in renamed.values()])
    world.emulator.faults(malformed_page_every=6)  # one page of the six listed
    summary = run_sync(say=lambda _: None)
    (failed, error), = summary["failed"].items()
    assert "could not be read" in error and "not a ListDirectoryUsersResponse" in error
    given = {u.user_id: u.given_name for u in warehouse_users().values()}
    assert all((given[u] == "Renamed") == (org != failed) for org, u in renamed.items())
    assert query(f"SELECT count(*) AS n FROM directory_users WHERE organization_id = '{failed}' "
                 "AND deleted_at IS NULL").n[0] == 45  # the failed organization's rows are as they were
    world.emulator.faults(malformed_page_every=0)
    run_sync(say=lambda _: None)
    assert all(u.given_name == "Renamed" for u in warehouse_users().values() if u.user_id in renamed.values())


def test_unreachable_scalekit_and_bad_credentials_fail_with_one_clear_line(world, monkeypatch, capsys):
    from scim_pipeline.cli import main

    monkeypatch.setenv("SCALEKIT_CLIENT_SECRET", "wrong")
    assert main(["sync"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "refused the client credentials" in err[-1] and "wrong" not in err[-1]

    from scim_pipeline.devstack.services import free_port

    monkeypatch.setenv("SCALEKIT_ENVIRONMENT_URL", f"https://localhost:{free_port()}")
    with pytest.raises(SyncFailed, match="unreachable"):
        run_sync(say=lambda _: None)


def test_sql_is_read_only_and_formats(world, capsys):
    from scim_pipeline.cli import main

    run_sync(say=lambda _: None)
    assert main(["sql", "SELECT count(*) AS n FROM directory_users", "--format", "json"]) == 0
    assert '"n": 90' in capsys.readouterr().out
    assert main(["sql", "SELECT organization_id FROM organizations ORDER BY 1", "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "organization_id"
    assert main(["sql", "DELETE FROM directory_users"]) == 1
    assert "read-only" in capsys.readouterr().err.lower()
    assert query("SELECT count(*) AS n FROM directory_users").n[0] == 90


def test_changes_dead_during_an_application_outage_are_delivered_by_the_next_full_sync(world):
    from scim_pipeline.definitions import defs
    from scim_pipeline.defs.instance import dagster_instance
    from scim_pipeline.devstack import services

    run_sync(say=lambda _: None)
    org = world.emulator.state()["organizations"][0]
    leavers = [u for u in org["users"] if u["active"]][:3]
    world.app.stop()  # the application goes down
    world.emulator.mutate([{"op": "deactivate_user", "user_id": u["id"]} for u in leavers])
    run_sync(delivery_backoff_s=0, say=lambda _: None)
    outage = defs.resolve_job_def("deliver_changes").execute_in_process(
        instance=dagster_instance(), run_config={"ops": {"deliver": {"config": {"max_attempts": 2, "backoff_s": 0}}}})
    assert outage.success
    dead = query("SELECT entity_key, op FROM change_sets WHERE status = 'dead'")
    assert {u["id"] for u in leavers} <= set(dead.entity_key) and (dead.op == "deactivate").sum() == 3

    app = services.start("app", [], world.home, port=world.app.port)  # back, at the same address
    try:
        run_sync(say=lambda _: None)  # the reconciliation tries them again, under the same change ids
        assert query("SELECT count(*) AS n FROM change_sets WHERE status = 'dead'").n[0] == 0
        assert world.differences() == []
        app_users = {u["user_id"]: u for u in world.app_state()["users"]}
        assert not any(app_users[u["id"]]["active"] for u in leavers)
        assert world.app_stats()["max_applications"] == 1
    finally:
        app.stop()


def test_a_deleted_organization_is_deprovisioned_through_the_guard(world, capsys):
    from scim_pipeline.cli import main

    run_sync(say=lambda _: None)
    org, *others = world.emulator.state()["organizations"]
    users = {u["id"] for u in org["users"]}
    world.emulator.client().organization.delete_organization(org["id"])  # no webhook: only the listings tell
    summary = run_sync(say=lambda _: None)  # the catalogue still names it: the sync finds it gone

    assert summary["failed"] == {}
    rows = warehouse_users()
    assert {uid for uid, r in rows.items() if r.organization_id == org["id"] and str(r.deleted_at) == "NaT"} == set()
    assert {uid for uid, r in rows.items() if r.organization_id == org["id"]} == users  # tombstones, not gone
    assert query(f"SELECT count(*) AS n FROM directories WHERE organization_id = '{org['id']}'").n[0] == 0
    assert query(f"SELECT count(*) AS n FROM organizations WHERE organization_id = '{org['id']}'").n[0] == 0
    # Every user's deletion is held by the guard (an accidental deletion must not wipe the application) ...
    held = query(f"SELECT entity_key, hold_reason FROM change_sets WHERE organization_id = '{org['id']}' "
                 "AND entity = 'user' AND op = 'delete' AND status = 'held'")
    assert set(held.entity_key) == users and set(held.hold_reason) == {"mass deprovisioning guard"}
    assert users <= {u["user_id"] for u in world.app_state()["users"]}
    # ... the other organizations are untouched, and a later sync holds the same changes, adding none.
    assert not [d for d in world.differences() if any(o["id"] in d for o in others)]
    ledger = f"SELECT change_id, status FROM change_sets WHERE organization_id = '{org['id']}' ORDER BY 1"
    before = query(ledger).values.tolist()
    run_sync(say=lambda _: None)
    assert query(ledger).values.tolist() == before

    # Approved, the deletions reach the application.
    assert main(["approve", "--org", org["id"]]) == 0
    run_sync(say=lambda _: None)
    assert not users & {u["user_id"] for u in world.app_state()["users"]}
    assert world.differences() == []
