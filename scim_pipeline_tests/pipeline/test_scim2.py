"""Delivery to a SCIM 2.0 application end to end: the emulator (real SDK over TLS), ``scim2-server`` in its own
process (a tenant per organization, a bearer token), DuckDB files and Dagster runs in the test's home. What the
application holds is read back over SCIM and judged by the same oracle as the demo application."""

import pytest

from scim_pipeline.commands import query, run_sync
from scim_pipeline.config import settings
from scim_pipeline.devstack.convergence import differences
from scim_pipeline.devstack.scim2_app import start_scim2_server
from scim_pipeline.provisioning.role_mapping import load_role_mapping
from scim_pipeline_tests.emulator_support import RunningEmulator
from scim_pipeline_tests.pipeline.test_webhook_events import apply_webhooks, start_receiver, wait_for_inbox

QUIET = {"say": lambda _: None}


class ScimWorld:
    def __init__(self, home, emulator, app):
        self.home, self.emulator, self.app = home, emulator, app

    def org_ids(self):
        return sorted(o["id"] for o in self.emulator.state()["organizations"])

    def app_state(self):
        return self.app.state(self.org_ids())

    def differences(self):
        return differences(self.app_state(), self.emulator.state(), load_role_mapping(settings().role_mappings_path()))

    def groups(self):
        """The application's groups: {(org, group id): (displayName, members)}."""
        return {(g["organization_id"], g["group_id"]): (g["display_name"], g["members"])
                for g in self.app_state()["groups"]}


@pytest.fixture
def scim_world(home, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster"))
    emulator = RunningEmulator(home, seed=3, orgs=3, users_per_org=20, groups_per_org=4)
    emulator.apply_env(monkeypatch)
    app = start_scim2_server(home)
    for name, value in app.env().items():
        monkeypatch.setenv(name, value)
    try:
        yield ScimWorld(home, emulator, app)
    finally:
        app.stop()
        emulator.stop()


def expected_groups(truth):
    """The directory's groups that have members (a group reaches the application with its first member)."""
    return {(o["id"], g["id"]): (g["display_name"], sorted(u["id"] for u in o["users"]
                                                           if g["id"] in {x["id"] for x in u["groups"]}))
            for o in truth["organizations"] for g in o["groups"]
            if any(g["id"] in {x["id"] for x in u["groups"]} for u in o["users"])}


def test_a_first_sync_and_directory_changes_converge_in_the_scim_application(scim_world):
    run_sync(**QUIET)
    state = scim_world.app_state()
    assert len({u["organization_id"] for u in state["users"]}) == 3  # a tenant per organization
    assert state["users"] and state["memberships"] and state["roles"]
    assert scim_world.differences() == []
    assert scim_world.groups() == expected_groups(scim_world.emulator.state())
    ids = query("SELECT resource_type, count(*) AS n FROM scim_ids GROUP BY 1 ORDER BY 1")
    assert dict(zip(ids.resource_type, ids.n)) == {"Group": len(scim_world.groups()), "User": len(state["users"])}

    org = scim_world.emulator.state()["organizations"][0]
    users = sorted(org["users"], key=lambda u: u["id"])
    groups = sorted(org["groups"], key=lambda g: g["id"])
    scim_world.emulator.mutate(directory_changes(org) + [
        {"op": "update_user", "user_id": users[2]["id"], "changes": {"family_name": "Renamed"}}])
    run_sync(**QUIET)

    assert scim_world.differences() == []
    assert scim_world.groups() == expected_groups(scim_world.emulator.state())
    app_users = {u["user_id"]: u for u in scim_world.app_state()["users"]}
    assert users[0]["id"] not in app_users and app_users[users[1]["id"]]["active"] is False
    assert app_users[users[2]["id"]]["family_name"] == "Renamed"
    assert (org["id"], groups[2]["id"]) not in scim_world.groups()
    assert scim_world.groups()[(org["id"], groups[1]["id"])][0] == "Platform Engineering"
    # Every change was applied, none is left over, and no account was made twice.
    leftover = query("SELECT status, count(*) AS n FROM change_sets WHERE status <> 'delivered' GROUP BY 1")
    assert leftover.empty, leftover
    user_names = [u["user_name"] for u in scim_world.app_state()["users"]]
    assert len(user_names) == len(set(user_names))


def directory_changes(org):
    """Every kind of directory change: deactivate, delete, create, membership removed, group renamed, group deleted."""
    users = sorted(org["users"], key=lambda u: u["id"])
    groups = sorted(org["groups"], key=lambda g: g["id"])
    member = next(u for u in users[3:] if u["groups"])
    return [
        {"op": "create_user", "organization_id": org["id"],
         "user": {"email": "new.hire@example.com", "given_name": "New", "family_name": "Hire"},
         "groups": [groups[0]["id"]]},
        {"op": "delete_user", "user_id": users[0]["id"]},
        {"op": "deactivate_user", "user_id": users[1]["id"]},
        {"op": "remove_member", "group_id": member["groups"][0]["id"], "user_id": member["id"]},
        {"op": "rename_group", "group_id": groups[1]["id"], "display_name": "Platform Engineering"},
        {"op": "delete_group", "group_id": groups[2]["id"]},
    ]


def test_directory_changes_converge_in_the_scim_application_through_the_webhook_path(scim_world):
    receiver = start_receiver(scim_world)
    try:
        run_sync(**QUIET)
        org = scim_world.emulator.state()["organizations"][1]
        results = scim_world.emulator.mutate(directory_changes(org))
        wait_for_inbox({e for r in results for e in r["event_ids"]})
        apply_webhooks(None)  # incremental runs, no full sync
        assert set(query("SELECT type FROM webhook_events").type) >= {
            "organization.directory.group_deleted", "organization.directory.user_deleted"}
        assert scim_world.differences() == []
        assert scim_world.groups() == expected_groups(scim_world.emulator.state())
        leftover = query("SELECT status FROM change_sets WHERE status <> 'delivered'")
        assert leftover.empty, leftover
    finally:
        receiver.stop()
