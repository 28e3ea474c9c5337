"""The inbox on PostgreSQL (SCIM_PIPELINE_POSTGRES_URL): receivers as users run them (`scim-pipeline webhooks`, each
with its own SCIM_PIPELINE_HOME) sharing one database of a real server that the session started."""

import json
import os
import subprocess
import sys
import threading
import time

import httpx
import psycopg2
import pytest

from scim_pipeline.devstack import services
from scim_pipeline.receiver.app import WEBHOOK_PATH
from scim_pipeline.receiver.inbox import Inbox
from scim_pipeline_tests.receiver.helpers import event_body, signed, stream_events


def start_receiver(home, secret: str, url: str) -> services.Service:
    return services.start("webhooks", [], home, timeout=30,
                          env={"SCALEKIT_WEBHOOK_SECRET": secret, "SCIM_PIPELINE_POSTGRES_URL": url})


def _sql(url: str, statement: str, params: tuple = ()) -> list[tuple]:
    conn = psycopg2.connect(url)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(statement, params)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def test_two_receivers_one_database_kill_9_loses_no_acknowledged_event(tmp_path, secret, postgres_url):
    """Two receivers with their own homes stream into one database while this process follows the inbox with a
    cursor; one is killed with SIGKILL mid-stream. Every event answered 2xx by either is stored with the seq it was
    answered with, a webhook-id sent to both is stored once, and the cursor saw every seq once, in order."""
    homes = [tmp_path / "a", tmp_path / "b"]
    for h in homes:
        h.mkdir()
    a, b = (start_receiver(h, secret, postgres_url) for h in homes)
    acked = [{}, {}]  # per receiver: webhook-id -> seq answered
    refused: list = []  # any answer but 2xx: two writers must never trip over each other
    lock, stop = threading.Lock(), threading.Event()
    threads = []
    try:
        for r, svc in enumerate((a, b)):
            for t in range(3):
                ids = [f"own{r}_{t}_{i}" for i in range(4000)]
                threads.append(threading.Thread(target=stream_events,
                                                args=(svc.url, secret, ids, acked[r], lock, stop, refused)))
            # Scalekit may deliver one event to either receiver (a retry behind the load balancer): same ids to both.
            shared = [f"shared_{i}" for i in range(4000)]
            threads.append(threading.Thread(target=stream_events,
                                            args=(svc.url, secret, shared, acked[r], lock, stop, refused)))
        for t in threads:
            t.start()
        reader, cursor, seen = Inbox(postgres_url), 0, []
        deadline = time.monotonic() + 30
        while len(seen) < 600 and time.monotonic() < deadline:
            page = reader.read_after(cursor, limit=500)
            if page:
                assert page[0].seq == cursor + 1 and page[-1].seq == cursor + len(page)  # in order, no gaps
                seen += [e.webhook_id for e in page]
                cursor = page[-1].seq
            time.sleep(0.01)
        assert len(seen) >= 600, a.log_tail() + b.log_tail()
        a.kill()  # SIGKILL while its senders are mid-stream
        with lock:
            b_before = len(acked[1])
        time.sleep(1.0)
        with lock:
            assert len(acked[1]) > b_before, "the other receiver stopped accepting: " + b.log_tail()
        # Follow on to the end: the cursor never skips an event committed late by the other receiver.
        stop.set()
        for t in threads:
            t.join(20)
        while page := reader.read_after(cursor, limit=5000):
            assert page[0].seq == cursor + 1 and page[-1].seq == cursor + len(page)
            seen += [e.webhook_id for e in page]
            cursor = page[-1].seq
    finally:
        stop.set()
        a.stop()
        b.stop()
        for t in threads:
            t.join(20)

    assert not refused, f"{len(refused)} events refused, e.g. {refused[:5]}"
    stored = {e.webhook_id: e.seq for e in Inbox(postgres_url).read_after(0, limit=10_000_000)}
    assert len(seen) == len(set(seen)) == len(stored)
    for answered in acked:
        missing = [w for w in answered if w not in stored]
        assert not missing, f"{len(missing)} acknowledged events lost, e.g. {missing[:5]}"
        assert all(stored[w] == seq for w, seq in answered.items())
    both = set(acked[0]) & set(acked[1])
    assert both and all(acked[0][w] == acked[1][w] for w in both)  # dedup across receivers: one row, one seq


def test_503_while_the_database_is_down_never_2xx_and_back_when_it_returns(home, secret, postgres_url,
                                                                          postgres_server):
    database = postgres_url.rsplit("/", 1)[1]
    admin = postgres_server.url()
    with start_receiver(home, secret, postgres_url) as svc, httpx.Client(base_url=svc.url, timeout=30) as http:
        body = event_body()
        assert http.post(WEBHOOK_PATH, content=body, headers=signed(secret, body, "before")).json() == {
            "status": "accepted", "seq": 1}
        # The database goes away: new connections are refused and the receiver's own is cut.
        _sql(admin, f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        _sql(admin, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (database,))
        try:
            for webhook_id in ("during_1", "during_2"):
                r = http.post(WEBHOOK_PATH, content=body, headers=signed(secret, body, webhook_id))
                assert r.status_code == 503 and r.json() == {"error": "inbox unavailable"}
            assert http.get("/healthz").status_code == 503
        finally:
            _sql(admin, f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
        # Scalekit retries: the event is stored now, once, and the sequence goes on without a hole.
        r = http.post(WEBHOOK_PATH, content=body, headers=signed(secret, body, "during_1"))
        assert r.json() == {"status": "accepted", "seq": 2}
        assert http.get("/healthz").json() == {"status": "ok", "last_seq": 2}
    assert [e.webhook_id for e in Inbox(postgres_url).read_after(0)] == ["before", "during_1"]
    assert "webhook rejected: status=503" in svc.log_path.read_text()


def _cli(home, command: str, url: str, secret: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SCIM_PIPELINE_HOME": str(home), "SCIM_PIPELINE_POSTGRES_URL": url,
           "SCALEKIT_WEBHOOK_SECRET": secret}
    args = ["--port", str(services.free_port())] if command == "webhooks" else []
    return subprocess.run([sys.executable, "-m", "scim_pipeline.cli", command, *args], env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("command", ["webhooks", "sync", "dev"])
@pytest.mark.parametrize("case", ["wrong password", "unreachable", "malformed"])
def test_a_database_that_refuses_is_one_line_naming_the_setting_at_start(home, secret, postgres_server, command,
                                                                         case):
    url = {"wrong password": postgres_server.url(password="not-the-password"),
           "unreachable": f"postgresql://scim:s3cret-pw@127.0.0.1:{services.free_port()}/postgres",
           "malformed": "mysql://scim:s3cret-pw@db/x"}[case]
    result = _cli(home, command, url, secret)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "SCIM_PIPELINE_POSTGRES_URL" in lines[0]
    says = {"wrong password": "password authentication failed", "unreachable": "Connection refused",
            "malformed": "is malformed"}[case]
    assert says in lines[0]
    assert "not-the-password" not in result.stderr and "s3cret-pw" not in result.stderr + result.stdout


def test_reading_creates_nothing_and_an_envelope_field_with_a_nul_is_kept_only_in_the_body(postgres_url):
    reader = Inbox(postgres_url)
    assert reader.read_after(0) == [] and reader.last_seq() == 0 and reader.organizations() == []
    assert _sql(postgres_url, "SELECT 1 FROM pg_namespace WHERE nspname = 'scim_pipeline'") == []
    body = json.dumps({"id": "evt_1", "organization_id": "org_\u0000x", "type": "organization.directory.user_created"})
    with Inbox(postgres_url) as inbox:
        assert inbox.put("msg_nul", body).seq == 1  # stored, not a 5xx that Scalekit would retry forever
    (event,) = reader.read_after(0)
    assert event.organization_id is None and event.payload["organization_id"] == "org_\u0000x"


def test_a_reader_whose_connection_was_cut_reads_on_with_a_new_one(postgres_url, postgres_server):
    with Inbox(postgres_url) as inbox:
        inbox.put("msg_1", "{}")
    reader = Inbox(postgres_url)
    assert reader.last_seq() == 1
    database = postgres_url.rsplit("/", 1)[1]
    # What a restart of the server does to a kept connection.
    _sql(postgres_server.url(), "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
         (database,))
    assert [e.webhook_id for e in reader.read_after(0)] == ["msg_1"]
