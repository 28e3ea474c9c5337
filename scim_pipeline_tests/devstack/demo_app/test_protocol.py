"""The demo application over HTTP, run as its own process: signatures, batch semantics, idempotency, state."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from datetime import datetime, timedelta, timezone

import pytest

from scim_pipeline_tests.devstack.demo_app.helpers import change, running_app, user

ORG = "org_1"


@pytest.fixture
def app(home):
    with running_app(home) as running:
        yield running


def raw_signature(secret: str, body: bytes) -> dict[str, str]:
    """A signature over bytes that are not text, which the library's signer cannot make."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    ts = str(int(time.time()))
    mac = hmac.new(key, b"msg_1." + ts.encode() + b"." + body, hashlib.sha256).digest()
    return {"webhook-id": "msg_1", "webhook-timestamp": ts, "webhook-signature": "v1," + base64.b64encode(mac).decode()}


def batch(batch_id: str, *changes: dict, org: str = ORG) -> dict:
    return {"batch_id": batch_id, "organization_id": org, "changes": list(changes)}


def statuses(response) -> dict[str, str]:
    assert response.status_code == 200, response.text
    return {r["change_id"]: r["status"] for r in response.json()["results"]}


def test_signed_batch_applies_and_state_shows_it(app):
    r = app.post(batch(
        "b1",
        change("c1", "user", "create", user("u2")),
        change("c2", "user", "create", user("u1")),
        change("c3", "membership", "add", {"group_id": "g1", "user_id": "u2", "group_name": "Eng"}),
        change("c4", "membership", "add", {"group_id": "g1", "user_id": "u1", "group_name": "Eng"}),
        change("c5", "role", "grant", {"user_id": "u1", "role_name": "admin"}),
    ))
    assert r.json()["results"][0] == {"change_id": "c1", "status": "applied", "error": None}
    assert set(statuses(r).values()) == {"applied"}
    app.post(batch("b2", change("c6", "user", "create", user("u9")), org="org_2"))

    state = app.state()
    assert [(u["organization_id"], u["user_id"]) for u in state["users"]] == [
        ("org_1", "u1"), ("org_1", "u2"), ("org_2", "u9")]
    assert state["users"][0] == {"organization_id": ORG, "user_id": "u1", "email": "u1@example.com",
                                 "given_name": "U1", "family_name": "Doe", "preferred_username": "u1", "active": True}
    assert state["memberships"] == [{"organization_id": ORG, "group_id": "g1", "user_id": "u1"},
                                    {"organization_id": ORG, "group_id": "g1", "user_id": "u2"}]
    assert state["roles"] == [{"organization_id": ORG, "user_id": "u1", "role_name": "admin"}]
    assert [u["user_id"] for u in app.state("org_2")["users"]] == ["u9"]
    assert app.stats()["max_applications"] == 1


def test_bad_missing_or_stale_signature_is_401_and_applies_nothing(app):
    payload = batch("b1", change("c1", "user", "create", user("u1")))
    wrong = "whsec_" + "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFB"
    for response in (
        app.post(payload, secret=wrong),
        app.post(payload, headers={}),
        app.post(payload, headers={"webhook-id": "m", "webhook-timestamp": "1", "webhook-signature": "garbage"}),
        app.post(payload, timestamp=datetime.now(tz=timezone.utc) - timedelta(minutes=10)),
        app.post(payload, timestamp=datetime.now(tz=timezone.utc) + timedelta(minutes=10)),
        app.post(body := b"\xff\xfe not utf-8", headers=raw_signature(app.secret, body)),
    ):
        assert response.status_code == 401, response.text
        assert "signature" in response.json()["error"]
    assert app.state()["users"] == []
    assert app.stats()["batches"] == 0


def test_malformed_json_or_shape_is_400(app):
    for body in (b"{not json", b"[]", b'{"batch_id": "b", "organization_id": "o"}',
                 b'{"batch_id": "b", "organization_id": "o", "changes": [{"entity": "user"}]}'):
        response = app.post(body)
        assert response.status_code == 400, body
        assert response.json()["error"].startswith("malformed batch")
    assert app.stats()["batches"] == 0


def test_a_rejected_change_does_not_block_the_others(app):
    r = app.post(batch(
        "b1",
        change("c1", "membership", "add", {"group_id": "g1", "user_id": "ghost", "group_name": "Eng"}),
        change("c2", "user", "create", user("u1")),
        change("c3", "role", "grant", {"user_id": "ghost", "role_name": "admin"}),
        change("c4", "user", "update", user("ghost")),
        change("c5", "user", "deactivate", {"user_id": "ghost"}),
        change("c6", "user", "reactivate", {"user_id": "ghost"}),
        change("c7", "group", "create", {"group_id": "g1"}),
        change("c8", "user", "promote", {"user_id": "u1"}),
        change("c9", "membership", "add", {"user_id": "u1", "group_name": "Eng"}, key=""),
        change("c10", "role", "grant", {"user_id": "u1"}, key=""),
        change("c11", "role", "grant", {"user_id": "u1", "role_name": "admin"}, key="u1/owner"),
        change("c12", "role", "grant", {"user_id": "u1", "role_name": "admin"}),
    ))
    results = {x["change_id"]: x for x in r.json()["results"]}
    assert [k for k, x in results.items() if x["status"] == "applied"] == ["c2", "c12"]
    assert "unknown user 'ghost'" in results["c1"]["error"]
    assert "unknown user 'ghost'" in results["c4"]["error"]
    assert "unknown entity 'group'" in results["c7"]["error"]
    assert "unknown op 'promote'" in results["c8"]["error"]
    assert results["c9"]["error"] == "data.group_id is required"
    assert results["c10"]["error"] == "data.role_name is required"
    assert "does not match" in results["c11"]["error"]
    state = app.state()
    assert [u["user_id"] for u in state["users"]] == ["u1"]
    assert state["memberships"] == [] and len(state["roles"]) == 1


def test_the_same_change_id_is_applied_once(app):
    create = change("c1", "user", "create", user("u1"))
    assert statuses(app.post(batch("b1", create))) == {"c1": "applied"}
    # A later batch carrying the same change again (its first answer was lost) plus a new one.
    renamed = change("c1", "user", "create", user("u1", email="changed@example.com"))
    assert statuses(app.post(batch("b2", renamed, change("c2", "role", "grant", {"user_id": "u1", "role_name": "r"})))) \
        == {"c1": "applied", "c2": "applied"}
    assert app.state()["users"][0]["email"] == "u1@example.com"  # not re-applied
    stats = app.stats()
    assert stats["applications"] == {"c1": 1, "c2": 1}
    assert stats["max_applications"] == 1 and stats["batches"] == 2


def test_the_same_idempotency_key_returns_the_first_answer(app):
    payload = batch("b1", change("c1", "membership", "add", {"group_id": "g", "user_id": "u1"}),
                    change("c2", "user", "create", user("u1")))
    first = app.post(payload)
    assert statuses(first) == {"c1": "rejected", "c2": "applied"}
    # The user exists now, yet the replay answers exactly what the first request got, and applies nothing.
    again = app.post({**payload, "changes": payload["changes"][::-1]})
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    assert app.state()["memberships"] == []
    # The same key for another batch is a client bug.
    conflict = app.post(batch("b1", change("c9", "user", "create", user("u9"))))
    assert conflict.status_code == 422 and "different batch" in conflict.json()["error"]
    stats = app.stats()
    assert stats["replays"] == 1 and stats["batches"] == 1 and stats["requests"] == 3


def test_user_lifecycle_delete_deactivate_and_no_ops(app):
    statuses(app.post(batch(
        "b1",
        change("c1", "user", "create", user("u1")),
        change("c2", "user", "create", user("u2")),
        change("c3", "membership", "add", {"group_id": "g1", "user_id": "u1", "group_name": "Eng"}),
        change("c4", "membership", "add", {"group_id": "g1", "user_id": "u2", "group_name": "Eng"}),
        change("c5", "role", "grant", {"user_id": "u1", "role_name": "admin"}),
        change("c6", "role", "grant", {"user_id": "u2", "role_name": "admin"}),
    )))
    r = app.post(batch(
        "b2",
        change("c7", "user", "update", {"user_id": "u2", "family_name": "Roe"}),
        change("c8", "user", "deactivate", {"user_id": "u2"}),
        change("c9", "user", "delete", {"user_id": "u1"}),
        change("c10", "user", "delete", {"user_id": "nobody"}),
        change("c11", "membership", "remove", {"group_id": "g7", "user_id": "u2"}),
        change("c12", "role", "revoke", {"user_id": "u2", "role_name": "owner"}),
        change("c13", "user", "create", user("u3", given_name="Ann")),
        change("c14", "user", "create", user("u3", given_name="Anne")),  # create of an existing user upserts
    ))
    assert set(statuses(r).values()) == {"applied"}
    state = app.state()
    assert [(u["user_id"], u["active"], u["family_name"], u["given_name"]) for u in state["users"]] == [
        ("u2", False, "Roe", "U2"), ("u3", True, "Doe", "Anne")]
    assert state["memberships"] == [{"organization_id": ORG, "group_id": "g1", "user_id": "u2"}]
    assert state["roles"] == [{"organization_id": ORG, "user_id": "u2", "role_name": "admin"}]

    statuses(app.post(batch("b3", change("c15", "user", "reactivate", {"user_id": "u2", "email": "new@example.com"}))))
    assert app.state()["users"][0] == {**state["users"][0], "active": True, "email": "new@example.com"}
