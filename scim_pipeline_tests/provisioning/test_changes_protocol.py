"""The delivery client against real HTTP servers on 127.0.0.1: the demo application, and scripted servers for the
answers the demo application does not give on demand (Retry-After dates, timeouts, partial answers)."""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from standardwebhooks import Webhook

from scim_pipeline.config import write_dotenv
from scim_pipeline.defs.resources import ApplicationResource
from scim_pipeline.devstack.services import free_port
from scim_pipeline.provisioning.changes_protocol import (
    ApplicationClient,
    ChangeResult,
    DeliveryRejected,
    DeliveryUnavailable,
    batch_id,
    parse_retry_after,
    send_changes,
)
from scim_pipeline.provisioning.ordering import batches, order_changes
from scim_pipeline_tests.devstack.demo_app.helpers import change, running_app, user

SECRET = "whsec_" + "dGVzdC1zZWNyZXQtdGVzdC1zZWNyZXQtdGVzdA=="


# -- a scripted server -----------------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int = 200
    headers: dict = field(default_factory=dict)
    body: object = None  # dict -> JSON; None -> every sent change applied
    delay: float = 0.0
    per_change_delay: float = 0.0  # an application whose time grows with the batch
    max_changes: int | None = None  # more changes than this in one request: 413
    max_bytes: int | None = None  # a body longer than this: 413


class Scripted:
    """Answers POSTs with the scripted replies in turn (the last one repeats) and records every request."""

    def __init__(self, replies: list[Reply]):
        self.replies, self.requests = list(replies), []
        scripted = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                scripted.requests.append((self.path, dict(self.headers), body))
                reply = scripted.replies.pop(0) if len(scripted.replies) > 1 else scripted.replies[0]
                sent = json.loads(body)["changes"]
                time.sleep(reply.delay + reply.per_change_delay * len(sent))
                payload, status = reply.body, reply.status
                if (reply.max_changes is not None and len(sent) > reply.max_changes) or (
                        reply.max_bytes is not None and len(body) > reply.max_bytes):
                    payload, status = {"error": "request entity too large"}, 413
                if payload is None and status == 200:
                    payload = {"results": [{"change_id": c["change_id"], "status": "applied", "error": None}
                                           for c in json.loads(body)["changes"]]}
                out = payload if isinstance(payload, bytes) else json.dumps(payload or {"error": "x"}).encode()
                try:
                    self.send_response(status)
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    self.send_header("content-length", str(len(out)))
                    self.end_headers()
                    self.wfile.write(out)
                except OSError:
                    pass  # the client gave up (timeout) before the answer

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


class Sleeps(list):
    """A ``sleep`` that records the delays instead of waiting."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def client(url: str, sleeps=None, **kw) -> ApplicationClient:
    return ApplicationClient(url, kw.pop("secret", SECRET), sleep=sleeps if sleeps is not None else Sleeps(),
                             rng=random.Random(1), **kw)


CHANGES = [change("c1", "user", "create", user("u1")), change("c2", "role", "grant", {"user_id": "u1", "role_name": "r"})]


# -- order -----------------------------------------------------------------------------------------------------


def test_order_changes_follows_the_protocol_order():
    ops = [("user", "delete"), ("role", "revoke"), ("membership", "add"), ("user", "update"), ("user", "create"),
           ("membership", "remove"), ("role", "grant"), ("user", "deactivate"), ("user", "reactivate"),
           ("user", "create"), ("thing", "poke")]
    changes = [{"change_id": f"c{i}", "entity": e, "op": o} for i, (e, o) in enumerate(ops)]
    ordered = [(c["entity"], c["op"], c["change_id"]) for c in order_changes(changes)]
    assert ordered == [
        ("user", "create", "c4"), ("user", "reactivate", "c8"), ("user", "create", "c9"),  # stable within a tier
        ("user", "update", "c3"), ("membership", "add", "c2"), ("role", "grant", "c6"),
        ("membership", "remove", "c5"), ("role", "revoke", "c1"),
        ("user", "deactivate", "c7"), ("user", "delete", "c0"),
        ("thing", "poke", "c10"),
    ]
    cut = batches(changes, size=4)
    assert [len(b) for b in cut] == [4, 4, 3]
    assert [c for b in cut for c in b] == order_changes(changes)


def test_batch_id_is_stable_for_the_same_changes():
    assert batch_id("org_1", ["b", "a"]) == batch_id("org_1", ["a", "b"])
    assert batch_id("org_1", ["a", "b"]) != batch_id("org_2", ["a", "b"])
    assert batch_id("org_1", ["a"]) != batch_id("org_1", ["a", "b"])


def test_parse_retry_after():
    now = time.time()
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(format_datetime(datetime.fromtimestamp(now + 20, tz=timezone.utc), usegmt=True), now) \
        == pytest.approx(20, abs=1)
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


# -- against the demo application --------------------------------------------------------------------------------


def test_delivers_to_the_demo_application(home):
    with running_app(home) as app, client(app.url, secret=app.secret) as c:
        results = c.send_batch("org_1", CHANGES + [change("c3", "membership", "add", {"group_id": "g", "user_id": "x"})])
        assert results[:2] == [ChangeResult("c1", "applied"), ChangeResult("c2", "applied")]
        assert results[2].status == "rejected" and "unknown user" in results[2].error
        assert app.state()["roles"] == [{"organization_id": "org_1", "user_id": "u1", "role_name": "r"}]
        assert c.send_batch("org_1", []) == []


def test_a_failing_and_rate_limiting_application_gets_every_batch_once(home):
    # Per attempt: 30% rate-limited, 25% fail before applying, 25% fail after applying (answer lost), 20% succeed.
    env = {"SCIM_PIPELINE_APP_SEED": "11"}
    with running_app(home, "--fail-rate", "0.5", "--rate-limit-rate", "0.3", env=env) as app:
        sleeps = Sleeps()
        changes = []
        for i in range(60):
            changes += [change(f"create-{i}", "user", "create", user(f"u{i}")),
                        change(f"grant-{i}", "role", "grant", {"user_id": f"u{i}", "role_name": "member"})]
        for i in range(0, 60, 3):
            changes.append(change(f"delete-{i}", "user", "delete", {"user_id": f"u{i}"}))
        with client(app.url, sleeps, secret=app.secret, max_attempts=60, backoff_base=0.001, backoff_max=0.01) as c:
            results = send_changes(c, "org_1", changes, batch_size=7)
        assert {r.status for r in results} == {"applied"} and len(results) == len(changes)

        stats, state = app.stats(), app.state()
        assert stats["faults"]["failed_after"] > 0 and stats["faults"]["rate_limited"] > 0
        assert stats["max_applications"] == 1 and stats["changes_applied"] == len(changes)
        assert [u["user_id"] for u in state["users"]] == sorted(f"u{i}" for i in range(60) if i % 3)
        assert len(state["roles"]) == 40
        # Retry-After: 1 honoured, though capped at backoff_max.
        assert sleeps.count(0.01) >= stats["faults"]["rate_limited"]


def test_a_wrong_secret_is_rejected_without_retrying(home):
    with running_app(home) as app:
        sleeps = Sleeps()
        with client(app.url, sleeps) as c, pytest.raises(DeliveryRejected) as err:
            c.send_batch("org_1", CHANGES)
        assert err.value.status_code == 401 and sleeps == []
        assert SECRET not in str(err.value) and "signature" in str(err.value)
        assert app.stats()["requests"] == 1 and app.state()["users"] == []


# -- against scripted servers -----------------------------------------------------------------------------------


def test_retry_after_is_honoured_and_retries_resend_the_same_batch():
    http_date = format_datetime(datetime.now(tz=timezone.utc) + timedelta(seconds=7), usegmt=True)
    replies = [Reply(429, {"Retry-After": "2"}), Reply(503, {"Retry-After": http_date}), Reply(500),
               Reply(429, {"Retry-After": "3600"}), Reply(200)]
    sleeps = Sleeps()
    with Scripted(replies) as server, client(server.url, sleeps, backoff_base=0.5, backoff_max=30) as c:
        # An hour is longer than the client waits within a request: the send ends with the time to come back.
        with pytest.raises(DeliveryUnavailable, match="asked to wait 3600s") as err:
            c.send_batch("org_1", CHANGES)
        assert err.value.retry_after == 3600 and err.value.maybe_applied  # the 503 and the 500 may have applied it
        assert [r.status for r in c.send_batch("org_1", CHANGES)] == ["applied", "applied"]  # a later delivery
    assert sleeps[0] == 2.0
    assert 5.0 <= sleeps[1] <= 7.0
    assert 0.0 <= sleeps[2] <= 0.5 * 2 ** 2  # no Retry-After: full jitter up to base * 2^(attempt-1)
    assert len(sleeps) == 3  # the hour was not slept on
    assert len(server.requests) == 5
    bodies = {body for _, _, body in server.requests}
    keys = {headers["idempotency-key"] for _, headers, _ in server.requests}
    assert len(bodies) == 1 and keys == {batch_id("org_1", ["c1", "c2"])}
    for path, headers, body in server.requests:
        assert path == "/scim/changes"
        Webhook(SECRET).verify(body, headers)  # each attempt is signed afresh, over the exact bytes sent
    sent = json.loads(bodies.pop())
    assert sent["batch_id"] == batch_id("org_1", ["c1", "c2"]) and sent["organization_id"] == "org_1"
    assert sent["changes"] == CHANGES


def test_an_unreachable_application_is_unavailable_quickly():
    sleeps = Sleeps()
    started = time.monotonic()
    with client(f"http://127.0.0.1:{free_port()}", sleeps, timeout=0.5, max_attempts=3) as c:
        with pytest.raises(DeliveryUnavailable) as err:
            c.send_batch("org_1", CHANGES)
    assert time.monotonic() - started < 3
    assert len(sleeps) == 2 and "not delivered after 3 attempts" in str(err.value)
    assert "connection failed" in str(err.value) and SECRET not in str(err.value)


def test_timeouts_are_retried_then_unavailable():
    with Scripted([Reply(200, delay=0.5)]) as server, client(server.url, timeout=0.1, max_attempts=2) as c:
        with pytest.raises(DeliveryUnavailable, match="timed out") as err:
            c.send_batch("org_1", CHANGES[:1])  # one change: nothing to split, so the same request again
        assert len(server.requests) == 2
        assert err.value.maybe_applied and err.value.retry_after is None


def test_other_4xx_are_rejected_and_not_retried():
    with Scripted([Reply(400, body={"error": "malformed batch: nope"})]) as server, client(server.url) as c:
        with pytest.raises(DeliveryRejected, match="HTTP 400.*malformed batch") as err:
            c.send_batch("org_1", CHANGES)
        assert err.value.status_code == 400 and len(server.requests) == 1


def test_an_incomplete_answer_counts_missing_changes_as_failed():
    answer = {"results": [{"change_id": "c2", "status": "rejected", "error": "no"},
                          {"change_id": "zz", "status": "applied"}, "junk"]}
    with Scripted([Reply(200, body=answer)]) as server, client(server.url) as c:
        assert c.send_batch("org_1", CHANGES) == [
            ChangeResult("c1", "failed", "no result in the application's answer"), ChangeResult("c2", "rejected", "no")]
    with Scripted([Reply(200, body=b"<html>"), Reply(200)]) as server, client(server.url) as c:
        assert [r.status for r in c.send_batch("org_1", CHANGES)] == ["applied", "applied"]


def test_deliver_changes_stops_at_the_first_batch_not_delivered():
    changes = [change(f"c{i}", "user", "create", user(f"u{i}")) for i in range(5)]
    with Scripted([Reply(200), Reply(503)]) as server, client(server.url, max_attempts=2) as c:
        results = send_changes(c, "org_1", changes, batch_size=2)
    assert [r.status for r in results] == ["applied"] * 2 + ["failed"] * 3
    assert "HTTP 503" in results[-1].error
    assert len(server.requests) == 3  # the third batch was never tried
    # The batch that got a 5xx may have been applied; the one never tried was not, and was not attempted.
    assert [(r.sent, r.in_doubt) for r in results[2:]] == [(True, True), (True, True), (False, False)]


def test_ledger_rows_are_accepted():
    row = {"change_id": "c1", "entity": "user", "op": "create", "entity_key": "u1", "payload": json.dumps(user("u1"))}
    with Scripted([Reply(200)]) as server, client(server.url) as c:
        c.send_batch("org_1", [row])
    assert json.loads(server.requests[0][2])["changes"] == [change("c1", "user", "create", user("u1"))]


def test_a_resend_on_a_later_run_is_a_new_request_for_the_application(home):
    """Ledger rows carry their attempts: a change rejected on one run is judged afresh on the next, not answered
    from the stored response, and a change applied before is still not applied again."""
    create = {**change("c1", "user", "create", user("u1")), "attempts": 0}
    grant = {**change("c2", "role", "grant", {"user_id": "u1", "role_name": "r"}), "attempts": 0}
    with running_app(home) as app, client(app.url, secret=app.secret) as c:
        assert c.send_batch("org_1", [grant])[0].status == "rejected"
        assert c.send_batch("org_1", [grant])[0].status == "rejected"  # same attempts: the stored answer
        assert c.send_batch("org_1", [create])[0].status == "applied"
        assert c.send_batch("org_1", [{**grant, "attempts": 1}]) == [ChangeResult("c2", "applied")]
        assert c.send_batch("org_1", [{**create, "attempts": 1}]) == [ChangeResult("c1", "applied")]
        stats = app.stats()
        assert stats["replays"] == 1 and stats["max_applications"] == 1


def test_the_dagster_resource_reads_the_settings(home):
    write_dotenv(home / "app.env", {"SCIM_PIPELINE_APP_SECRET": SECRET, "SCIM_PIPELINE_APP_URL": "http://127.0.0.1:9/"})
    with ApplicationResource().client() as c:
        assert c.url == "http://127.0.0.1:9" and c.max_attempts == 5
    with ApplicationResource(url="http://127.0.0.1:10", max_attempts=2).client() as c:
        assert c.url == "http://127.0.0.1:10" and c.max_attempts == 2
    assert SECRET not in repr(ApplicationResource().client())


def test_a_batch_too_large_is_halved_down_to_what_the_application_takes():
    changes = [change(f"c{i}", "user", "create", user(f"u{i}")) for i in range(10)]
    sleeps = Sleeps()
    with Scripted([Reply(200, max_changes=3)]) as server, client(server.url, sleeps) as c:
        results = send_changes(c, "org_1", changes, batch_size=10)
    assert [r.status for r in results] == ["applied"] * 10
    sizes = [len(json.loads(body)["changes"]) for _, _, body in server.requests]
    assert sizes == [10, 5, 2, 2, 2, 2, 2]  # halved until it fits, then kept at the size that went through
    assert sleeps == []  # splitting is the retry: nothing waited


def test_a_single_change_still_too_large_is_rejected_and_the_others_go_through():
    big = change("big", "user", "create", user("u_big", given_name="x" * 5000))
    changes = [change(f"c{i}", "user", "create", user(f"u{i}")) for i in range(4)]
    with Scripted([Reply(200, max_bytes=3000)]) as server, client(server.url) as c:
        results = send_changes(c, "org_1", changes[:2] + [big] + changes[2:], batch_size=8)
    by_id = {r.change_id: r for r in results}
    assert by_id["big"].status == "rejected" and by_id["big"].error.startswith("HTTP 413")
    assert all(by_id[f"c{i}"].status == "applied" for i in range(4))
    assert len(results) == 5


def test_a_batch_slower_than_the_timeout_is_split_until_it_is_answered_in_time():
    changes = [change(f"c{i}", "user", "create", user(f"u{i}")) for i in range(24)]
    sleeps = Sleeps()
    with Scripted([Reply(200, per_change_delay=0.05)]) as server, client(server.url, sleeps, timeout=0.6) as c:
        results = send_changes(c, "org_1", changes, batch_size=16)
    assert [r.status for r in results] == ["applied"] * 24
    sizes = [len(json.loads(body)["changes"]) for _, _, body in server.requests]
    assert sizes == [16, 8, 8, 8]  # 16 changes take 0.8 s: halved once, then kept at 8
    assert sleeps == []


def test_a_long_retry_after_ends_the_send_without_sleeping_and_marks_nothing_in_doubt():
    changes = [change(f"c{i}", "user", "create", user(f"u{i}")) for i in range(4)]
    sleeps = Sleeps()
    with Scripted([Reply(429, {"Retry-After": "120"})]) as server, client(server.url, sleeps) as c:
        results = send_changes(c, "org_1", changes, batch_size=2)
    assert sleeps == [] and len(server.requests) == 1
    assert [(r.status, r.sent, r.in_doubt, r.retry_after) for r in results] == [
        ("failed", True, False, 120.0), ("failed", True, False, 120.0),  # rate-limited: not applied
        ("failed", False, False, None), ("failed", False, False, None)]  # never sent


def test_a_refused_request_rejects_its_changes_and_stops_the_later_batches():
    changes = [change(f"c{i}", "user", "create", user(f"u{i}")) for i in range(4)]
    with Scripted([Reply(422, body={"error": "unprocessable: nope"})]) as server, client(server.url) as c:
        results = send_changes(c, "org_1", changes, batch_size=2)
    assert len(server.requests) == 1
    assert [(r.status, r.sent) for r in results] == [("rejected", True)] * 2 + [("failed", False)] * 2
    assert results[0].error.startswith("HTTP 422: ") and "unprocessable: nope" in results[0].error
    assert not any(r.in_doubt for r in results)


def test_408_is_retried_like_a_timeout():
    with Scripted([Reply(408), Reply(200)]) as server, client(server.url) as c:
        assert [r.status for r in c.send_batch("org_1", CHANGES[:1])] == ["applied"]
        assert len(server.requests) == 2


def test_a_change_the_answer_does_not_account_for_is_in_doubt():
    answer = {"results": [{"change_id": "c2", "status": "queued"}]}
    with Scripted([Reply(200, body=answer)]) as server, client(server.url) as c:
        results = c.send_batch("org_1", CHANGES)
    assert [(r.status, r.in_doubt) for r in results] == [("failed", True), ("failed", True)]
