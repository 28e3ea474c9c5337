"""The application's store in process: the parts of the change vocabulary that need no HTTP to show."""

from __future__ import annotations

import pytest

from scim_pipeline.devstack.demo_app.store import Batch, Store, parse_batch
from scim_pipeline_tests.devstack.demo_app.helpers import change, user


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "app.sqlite")
    yield s
    s.close()


def apply(store: Store, *changes: dict, key: str = "k", org: str = "o") -> dict[str, str | None]:
    response, _ = store.apply(key, Batch(key, org, list(changes)))
    return {r["change_id"]: r["error"] or r["status"] for r in response["results"]}


def test_identity_from_key_or_data_and_checked_values(store):
    assert apply(store, change("c1", "user", "create", user("u1")),
                 change("c2", "user", "update", {"given_name": "Ann"}, key="u1"),  # identity from the key
                 change("c3", "user", "update", {"user_id": "u1", "active": "yes"}),
                 change("c4", "user", "update", {"user_id": "u1", "email": 7}),
                 change("c5", "user", "update", ["not", "an", "object"], key="u1"),
                 change("c6", "membership", "add", {"group_name": "Eng"}, key="g1/u1"),
                 change("c7", "user", "delete", None, key="u2"),
                 {"change_id": "c8", "entity": "user", "op": "create", "data": {"email": "x@example.com"}},
                 change("c9", "user", "create", {"user_id": "u3"})) == {
        "c1": "applied", "c2": "applied", "c3": "data.active must be true or false",
        "c4": "data.email must be a string", "c5": "data must be an object", "c6": "applied", "c7": "applied",
        "c8": "data.user_id is required", "c9": "applied"}
    state = store.state()
    assert state["users"][0]["given_name"] == "Ann" and state["users"][0]["family_name"] == "Doe"
    assert state["memberships"] == [{"organization_id": "o", "group_id": "g1", "user_id": "u1"}]


def test_users_are_scoped_by_organization(store):
    apply(store, change("c1", "user", "create", user("u1")), org="o1", key="k1")
    assert apply(store, change("c2", "role", "grant", {"user_id": "u1", "role_name": "r"}), org="o2", key="k2") == {
        "c2": "unknown user 'u1' in organization 'o2'"}
    apply(store, change("c3", "user", "delete", {"user_id": "u1"}), org="o2", key="k3")
    assert [u["organization_id"] for u in store.state()["users"]] == ["o1"]


def test_a_rejected_change_is_judged_again_when_resent(store):
    grant = change("c2", "role", "grant", {"user_id": "u1", "role_name": "r"})
    assert apply(store, grant, key="k1") == {"c2": "unknown user 'u1' in organization 'o'"}
    assert apply(store, change("c1", "user", "create", user("u1")), grant, key="k2") == {"c1": "applied", "c2": "applied"}
    assert store.stats()["applications"] == {"c1": 1, "c2": 1}


def test_stored_answers_expire(tmp_path):
    store = Store(tmp_path / "app.sqlite", idempotency_ttl_s=0)
    grant = change("c2", "role", "grant", {"user_id": "u1", "role_name": "r"})
    assert apply(store, grant) == {"c2": "unknown user 'u1' in organization 'o'"}
    apply(store, change("c1", "user", "create", user("u1")), key="other")
    _, replayed = store.apply("k", Batch("k", "o", [grant]))
    assert not replayed and store.state()["roles"] != []
    store.close()


def test_parse_batch_names_what_is_wrong():
    for payload, message in ((1, "body must be a JSON object"), ({"organization_id": "o", "changes": []}, "batch_id"),
                             ({"batch_id": "b", "changes": []}, "organization_id"),
                             ({"batch_id": "b", "organization_id": "o", "changes": {}}, "changes must be a list"),
                             ({"batch_id": "b", "organization_id": "o", "changes": [1]}, "changes[0] must be an object")):
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            parse_batch(payload)
