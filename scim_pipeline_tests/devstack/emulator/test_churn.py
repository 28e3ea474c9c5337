"""Churn: realistic mutations drawn from the seed, applied through the mutation path (so they emit events)."""

from collections import Counter

from scim_pipeline.devstack.emulator.churn import Churn
from scim_pipeline.devstack.emulator.server import Emulator


def _churned(home, steps: int) -> tuple[dict, list[dict]]:
    emulator = Emulator(home, seed=9, orgs=2, users_per_org=30, groups_per_org=5)
    churn = Churn(emulator, per_minute=60, seed=9)
    for _ in range(steps):
        churn.step()
    return emulator.store.truth(), emulator.recent_events_json()


def test_churn_is_deterministic_and_varied(tmp_path):
    first, events = _churned(tmp_path / "a", 120)
    second, _ = _churned(tmp_path / "b", 120)
    assert first == second
    kinds = Counter(e["type"] for e in events)
    assert kinds["organization.directory.user_created"] and kinds["organization.directory.user_updated"]
    assert kinds["organization.directory.user_deleted"] or kinds["organization.directory.group_created"]
    untouched = Emulator(tmp_path / "c", seed=9, orgs=2, users_per_org=30, groups_per_org=5).store.truth()
    assert untouched != first


def test_churn_reaches_organizations_created_after_start_up(tmp_path):
    emulator = Emulator(tmp_path, seed=9, orgs=0, users_per_org=0, groups_per_org=0)
    org = emulator.mutate([{"op": "create_organization", "organization": {"display_name": "Hooli"}}])[0].id
    directory = emulator.mutate([{"op": "create_directory", "organization_id": org}])[0].id  # no users, no groups
    churn = Churn(emulator, per_minute=60, seed=9)
    for _ in range(30):
        churn.step()
    users = emulator.store.truth(org)["organizations"][0]["users"]
    assert users and {u["directory_id"] for u in users} == {directory}
    assert all(u["email"].endswith(".example.com") for u in users)
