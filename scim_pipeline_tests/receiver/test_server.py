"""The receiver as users run it: `scim-pipeline webhooks` in its own process, over real HTTP."""

import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from scim_pipeline.devstack import services
from scim_pipeline.receiver.app import WEBHOOK_PATH
from scim_pipeline.receiver.inbox import Inbox
from scim_pipeline_tests.receiver.helpers import event_body, new_secret, signed, stream_events


def start_receiver(home, secrets: str) -> services.Service:
    return services.start("webhooks", [], home, env={"SCALEKIT_WEBHOOK_SECRET": secrets}, timeout=30)


def test_probe_matrix_over_http(home, secret):
    old = new_secret()
    with start_receiver(home, f"{secret} {old}") as svc, httpx.Client(base_url=svc.url, timeout=10) as http:
        body = event_body()
        headers = signed(secret, body, "msg_valid")
        assert http.post(WEBHOOK_PATH, content=body, headers=headers).json() == {"status": "accepted", "seq": 1}
        dup = http.post(WEBHOOK_PATH, content=body, headers=headers)
        assert dup.status_code == 200 and dup.json()["status"] == "duplicate"

        body = event_body()
        assert http.post(WEBHOOK_PATH, content=body, headers=signed(old, body)).status_code == 200  # rotation
        assert http.post(WEBHOOK_PATH, content=body, headers=signed(new_secret(), body)).status_code == 401
        assert http.post(WEBHOOK_PATH, content=body + b" ", headers=signed(secret, body)).status_code == 401
        stale = signed(secret, body, timestamp=int(time.time()) - 400)
        future = signed(secret, body, timestamp=int(time.time()) + 400)
        assert http.post(WEBHOOK_PATH, content=body, headers=stale).status_code == 401
        assert http.post(WEBHOOK_PATH, content=body, headers=future).status_code == 401
        assert http.post(WEBHOOK_PATH, content=body).status_code == 401

        bad = b'{"type": '
        assert http.post(WEBHOOK_PATH, content=bad, headers=signed(secret, bad)).status_code == 400

        unknown = event_body("organization.brand_new_event")
        assert http.post(WEBHOOK_PATH, content=unknown, headers=signed(secret, unknown)).status_code == 200

        big = event_body(padding="x" * (1024 * 1024))
        r = http.post(WEBHOOK_PATH, content=big, headers=signed(secret, big))
        assert r.status_code == 413
        chunks = (big[i:i + 65536] for i in range(0, len(big), 65536))  # chunked: no Content-Length
        r = http.post(WEBHOOK_PATH, content=chunks, headers=signed(secret, big))
        assert r.status_code == 413 and r.json() == {"error": "body over 1048576 bytes"}

        # Headers that cannot be parsed are refused like any other bad signature, never a 500.
        for header, value in (("webhook-timestamp", b"9" * 5000), ("webhook-timestamp", "\u0661".encode())):
            r = http.post(WEBHOOK_PATH, content=body, headers={**signed(secret, body), header: value})
            assert r.status_code == 401, r.text

        assert http.get("/healthz").json() == {"status": "ok", "last_seq": 3}
    assert svc.process.returncode == 0  # SIGTERM: a clean shutdown
    assert [e.webhook_id for e in Inbox(home / "inbox.sqlite").read_after(0)][0] == "msg_valid"
    log = svc.log_path.read_text()
    assert log.count("webhook rejected") == 10
    assert secret[6:] not in log and old[6:] not in log


def test_removed_secret_is_rejected_after_restart(home):
    old, new = new_secret(), new_secret()
    with start_receiver(home, new) as svc, httpx.Client(base_url=svc.url, timeout=10) as http:
        body = event_body()
        assert http.post(WEBHOOK_PATH, content=body, headers=signed(old, body)).status_code == 401
        assert http.post(WEBHOOK_PATH, content=body, headers=signed(new, body)).status_code == 200


def test_every_acknowledged_event_survives_kill_9(home, secret):
    """Threads stream events while this process follows the inbox from its own connection; kill -9 mid-stream; every
    event answered 2xx is in the inbox, with the seq it was answered with, and the receiver restarts on that file."""
    path = home / "inbox.sqlite"
    acked: dict[str, int] = {}
    lock, stop = threading.Lock(), threading.Event()
    svc = start_receiver(home, secret)
    try:
        threads = [threading.Thread(target=stream_events, args=(
                       svc.url, secret, [f"t{t}_{i}" for i in range(5000)], acked, lock, stop))
                   for t in range(6)]
        for t in threads:
            t.start()
        reader, cursor, followed = Inbox(path), 0, 0
        deadline = time.monotonic() + 20
        while followed < 400 and time.monotonic() < deadline:
            page = reader.read_after(cursor, limit=500)
            if page:
                assert page[0].seq == cursor + 1 and page[-1].seq == cursor + len(page)  # no gaps, no repeats
                followed, cursor = followed + len(page), page[-1].seq
            time.sleep(0.01)
        assert followed >= 400, svc.log_tail()
        svc.kill()  # SIGKILL while the senders are mid-stream
    finally:
        stop.set()
        svc.stop()
        for t in threads:
            t.join(10)
    assert len(acked) >= 400

    with start_receiver(home, secret) as again, httpx.Client(base_url=again.url, timeout=10) as http:
        stored = {e.webhook_id: e.seq for e in Inbox(path).read_after(0, limit=1_000_000)}
        missing = [w for w in acked if w not in stored]
        assert not missing, f"{len(missing)} acknowledged events lost, e.g. {missing[:5]}"
        assert all(stored[w] == seq for w, seq in acked.items())
        # Restarted on the same file: duplicates still recognised, new events continue the sequence.
        webhook_id, seq = next(iter(acked.items()))
        body = event_body()
        r = http.post(WEBHOOK_PATH, content=body, headers=signed(secret, body, webhook_id))
        assert r.json() == {"status": "duplicate", "seq": seq}
        r = http.post(WEBHOOK_PATH, content=body, headers=signed(secret, body, "after_restart"))
        assert r.json()["seq"] == max(stored.values()) + 1


def _run_cli(home, port: int, env_extra: dict) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SCALEKIT_WEBHOOK_SECRET"}
    env.update(SCIM_PIPELINE_HOME=str(home), **env_extra)
    return subprocess.run([sys.executable, "-m", "scim_pipeline.cli", "webhooks", "--port", str(port)],
                          env=env, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("value, says", [
    (None, "is not set"), ("not-a-secret", "is malformed"),
    # A key that decodes to 1 byte, and one that is not even base64: refused before serving, not at the first event.
    ("whsec_AA", "is too short"), ("whsec_A", "is malformed"),
    # One short secret among good ones spoils the rotation list: it is named, not skipped.
    (f"{new_secret()} whsec_AAAA", "is too short"),
])
def test_missing_or_malformed_secret_is_one_line(home, value, says):
    result = _run_cli(home, services.free_port(), {} if value is None else {"SCALEKIT_WEBHOOK_SECRET": value})
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "SCALEKIT_WEBHOOK_SECRET" in lines[0] and says in lines[0], result.stderr
    for secret in (value or "").split():
        assert secret not in result.stderr


def test_port_taken_is_one_line(home, secret):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _run_cli(home, port, {"SCALEKIT_WEBHOOK_SECRET": secret})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "already in use" in lines[0] and str(port) in lines[0], result.stderr
