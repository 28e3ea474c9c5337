"""Signed Scalekit events for the receiver tests."""

import base64
import hashlib
import hmac
import itertools
import json
import os
import threading
import time
from datetime import datetime, timezone

import httpx
from standardwebhooks import Webhook

from scim_pipeline.receiver.app import WEBHOOK_PATH

_ids = itertools.count(1)


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


def event_body(type_: str = "organization.directory.user_created", org: str = "org_1", **extra) -> bytes:
    """A Scalekit envelope, serialized the way a producer would (key order and spacing are its own business)."""
    n = next(_ids)
    envelope = {
        "spec_version": "1", "id": f"evt_{n}", "type": type_, "occurred_at": "2026-11-28T15:00:00.000Z",
        "environment_id": "env_1", "organization_id": org, "object": "DirectoryUser",
        "data": {"id": f"diruser_{n}", "email": f"user{n}@example.com"}, **extra,
    }
    return json.dumps(envelope).encode()


def signed(secret: str, body: bytes, webhook_id: str | None = None, timestamp: int | None = None) -> dict[str, str]:
    """Standard Webhooks headers made by the reference library, so that every probe also checks interoperability."""
    webhook_id = webhook_id or f"msg_{next(_ids)}_{time.monotonic_ns()}"
    ts = int(time.time()) if timestamp is None else timestamp
    signature = Webhook(secret).sign(webhook_id, datetime.fromtimestamp(ts, timezone.utc), body.decode())
    return {"webhook-id": webhook_id, "webhook-timestamp": str(ts), "webhook-signature": signature}


def signed_bytes(secret: str, body: bytes, webhook_id: str = "msg_bytes",
                 timestamp: int | None = None) -> dict[str, str]:
    """Standard Webhooks headers computed by hand over the raw bytes: the reference library signs only text, and
    these also check that what the receiver accepts is the protocol, not just whatever that library produces."""
    ts = str(int(time.time()) if timestamp is None else timestamp)
    key = base64.b64decode(secret.removeprefix("whsec_") + "==")
    mac = hmac.new(key, b"%s.%s.%s" % (webhook_id.encode(), ts.encode(), body), hashlib.sha256).digest()
    signature = "v1," + base64.b64encode(mac).decode()
    return {"webhook-id": webhook_id, "webhook-timestamp": ts, "webhook-signature": signature}


def stream_events(url: str, secret: str, ids: list[str], acked: dict, lock: threading.Lock,
                  stop: threading.Event, refused: list | None = None) -> None:
    """Post a signed event under each webhook id of ``ids`` until ``stop``; record each acknowledged one's seq in
    ``acked`` and, if given, each refused one in ``refused``. Ends quietly when the receiver goes away (killed)."""
    with httpx.Client(base_url=url, timeout=5) as http:
        for webhook_id in ids:
            if stop.is_set():
                return
            body = event_body()
            try:
                r = http.post(WEBHOOK_PATH, content=body, headers=signed(secret, body, webhook_id))
            except httpx.HTTPError:
                return  # the receiver is gone: whatever was not answered need not have survived
            if r.status_code // 100 == 2:
                with lock:
                    acked[webhook_id] = r.json()["seq"]
            elif refused is not None:
                refused.append((webhook_id, r.status_code))
