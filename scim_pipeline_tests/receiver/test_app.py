"""The probe matrix against the ASGI app in process (the same probes against the real server: test_server.py)."""

import json
import logging
import time

import pytest
from starlette.testclient import TestClient

from scim_pipeline.receiver.app import WEBHOOK_PATH, create_app
from scim_pipeline.receiver.inbox import Inbox
from scim_pipeline_tests.receiver.helpers import event_body, new_secret, signed, signed_bytes


@pytest.fixture
def inbox_path(home):
    return home / "inbox.sqlite"


@pytest.fixture
def client(inbox_path, secret):
    with TestClient(create_app(inbox_path, [secret])) as client:
        yield client


def post(client, body: bytes, headers: dict):
    return client.post(WEBHOOK_PATH, content=body, headers=headers)


def stored_ids(inbox_path):
    return [e.webhook_id for e in Inbox(inbox_path).read_after(0)]


def test_valid_event_is_stored_before_200(client, secret, inbox_path):
    body = event_body()
    r = post(client, body, signed(secret, body, "msg_1"))
    assert r.status_code == 200 and r.json() == {"status": "accepted", "seq": 1}
    (event,) = Inbox(inbox_path).read_after(0)
    assert event.webhook_id == "msg_1" and event.body.encode() == body


def test_duplicate_webhook_id_is_2xx_and_stored_once(client, secret, inbox_path):
    body = event_body()
    headers = signed(secret, body, "msg_1")
    assert post(client, body, headers).json()["status"] == "accepted"
    r = post(client, body, headers)
    assert r.status_code == 200 and r.json()["status"] == "duplicate"
    assert stored_ids(inbox_path) == ["msg_1"]


def test_unknown_type_is_stored(client, secret, inbox_path):
    body = event_body("organization.something_new", org="org_2")
    assert post(client, body, signed(secret, body)).status_code == 200
    (event,) = Inbox(inbox_path).read_after(0)
    assert event.type == "organization.something_new"


@pytest.mark.parametrize("probe", ["wrong_secret", "tampered", "stale", "future", "no_id", "no_timestamp",
                                   "no_signature", "no_headers", "other_scheme_only"])
def test_rejected_with_401_and_nothing_stored(client, secret, inbox_path, probe, caplog):
    body = event_body()
    headers = signed(secret, body)
    if probe == "wrong_secret":
        headers = signed(new_secret(), body)
    elif probe == "tampered":
        body = body.replace(b"user", b"admin", 1)
    elif probe == "stale":
        headers = signed(secret, body, timestamp=int(time.time()) - 301)
    elif probe == "future":
        headers = signed(secret, body, timestamp=int(time.time()) + 301)
    elif probe == "other_scheme_only":
        headers["webhook-signature"] = headers["webhook-signature"].replace("v1,", "v2,")
    elif probe == "no_headers":
        headers = {}
    else:
        del headers["webhook-" + probe[3:]]
    with caplog.at_level(logging.WARNING, logger="scim_pipeline.receiver"):
        r = post(client, body, headers)
    assert r.status_code == 401 and set(r.json()) == {"error"}
    assert stored_ids(inbox_path) == []
    (record,) = [r for r in caplog.records if r.name == "scim_pipeline.receiver"]
    assert "status=401" in record.getMessage()
    assert secret not in record.getMessage() and secret[6:] not in record.getMessage()
    assert secret not in r.text


@pytest.mark.parametrize("header, value", [
    ("webhook-timestamp", b"9" * 5000),  # past int()'s 4300-digit limit
    ("webhook-timestamp", b"1e400"), ("webhook-timestamp", b"nan"), ("webhook-timestamp", b"-inf"),
    ("webhook-timestamp", "\u0661\u0668\u0660\u0660".encode()),  # Arabic-Indic digits, sent as UTF-8 bytes
    ("webhook-timestamp", b"\xff\xfe"),
    ("webhook-signature", b"v1"), ("webhook-signature", b"v1,a,b"), ("webhook-signature", b"v1,abc"),
    ("webhook-signature", "v1,\u00e9\u00e9\u00e9\u00e9".encode()), ("webhook-signature", b"v1,\xff\xfe"),
    ("webhook-id", "\u00e9".encode()),
])
def test_unparseable_header_is_401_not_500(client, secret, inbox_path, header, value):
    body = event_body()
    headers = {**signed(secret, body), header: value}
    r = post(client, body, headers)
    assert r.status_code == 401 and set(r.json()) == {"error"}
    assert stored_ids(inbox_path) == []


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'"text"', b"", b"\xff\xfe{}"])
def test_malformed_json_is_400(client, secret, inbox_path, body):
    r = post(client, body, signed(secret, body) if body.isascii() else signed_bytes(secret, body))
    assert r.status_code == 400 and "error" in r.json()
    assert stored_ids(inbox_path) == []


def test_a_body_that_is_not_utf8_is_400_signed_or_not(client, secret, inbox_path):
    # The signature is checked over text, which such a body is not; it could not be JSON either.
    body = b'{"type": "\xe9"}'
    for headers in (signed_bytes(secret, body), {}):
        r = post(client, body, headers)
        assert r.status_code == 400 and r.json() == {"error": "body is not valid JSON"}
    assert stored_ids(inbox_path) == []


def test_oversized_body_is_413_with_content_length(client, secret, inbox_path):
    body = event_body(padding="x" * (1024 * 1024))
    r = post(client, body, signed(secret, body))
    assert r.status_code == 413
    assert stored_ids(inbox_path) == []


def test_oversized_body_is_413_when_streamed_without_length(client, secret):
    body = event_body(padding="x" * (1024 * 1024))
    chunks = (body[i:i + 65536] for i in range(0, len(body), 65536))
    r = client.post(WEBHOOK_PATH, content=chunks, headers=signed(secret, body))
    assert r.status_code == 413


def test_exactly_the_limit_is_accepted(inbox_path, secret):
    body = event_body()
    with TestClient(create_app(inbox_path, [secret], max_body=len(body))) as client:
        assert post(client, body, signed(secret, body)).status_code == 200
        bigger = body[:-1] + b' }'
        assert post(client, bigger, signed(secret, bigger)).status_code == 413


def test_rotation_accepts_every_configured_secret(inbox_path):
    old, new = new_secret(), new_secret()
    body_old, body_new = event_body(), event_body()
    with TestClient(create_app(inbox_path, [new, old])) as client:
        assert post(client, body_old, signed(old, body_old)).status_code == 200
        assert post(client, body_new, signed(new, body_new)).status_code == 200
    body = event_body()
    with TestClient(create_app(inbox_path, [new])) as client:
        assert post(client, body, signed(old, body)).status_code == 401
        assert post(client, body, signed(new, body)).status_code == 200
    assert Inbox(inbox_path).count() == 3


def test_healthz(client, secret):
    assert client.get("/healthz").json() == {"status": "ok", "last_seq": 0}
    body = event_body()
    post(client, body, signed(secret, body))
    assert client.get("/healthz").json() == {"status": "ok", "last_seq": 1}


def test_no_storage_mode_touches_no_inbox(inbox_path, secret):
    body = event_body()
    with TestClient(create_app(inbox_path, [secret], store=False)) as client:
        assert post(client, body, signed(secret, body)).json() == {"status": "accepted"}
        assert post(client, body, signed(new_secret(), body)).status_code == 401
    assert not inbox_path.exists()


def test_storage_failure_is_503_not_2xx(inbox_path, secret):
    app = create_app(inbox_path, [secret])
    with TestClient(app) as client:
        app.state.inbox.close()  # a writer that is gone: the event cannot be made durable
        body = event_body()
        r = post(client, body, signed(secret, body))
    assert r.status_code == 503 and r.json() == {"error": "inbox unavailable"}


def test_only_post_on_the_webhook_path(client):
    assert client.get(WEBHOOK_PATH).status_code == 405
    assert client.post("/elsewhere", content=b"{}").status_code == 404


def test_json_error_bodies(client):
    r = post(client, b"{}", {})
    assert r.headers["content-type"] == "application/json"
    assert json.loads(r.text) == {"error": "missing webhook headers"}
