"""Delivery of directory events to the configured endpoint, as Scalekit delivers them: JSON bodies signed with
Standard Webhooks headers, POSTed by a background thread, retried on failure on Scalekit's schedule (time-compressed
by ``retry_time_scale``), with the injected webhook faults (drop, duplicate, reorder, delay) applied here.

Duplicates keep their ``webhook-id`` (an at-least-once redelivery, as a receiver sees it in real life); every
attempt is signed afresh with the current time.
"""

from __future__ import annotations

import base64
import datetime as dt
import heapq
import itertools
import json
import logging
import random
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import httpx
from standardwebhooks import Webhook

from scim_pipeline.devstack.emulator.gateway import FaultInjector

log = logging.getLogger(__name__)

# Scalekit's schedule: immediately, then 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h after each failure.
RETRY_SCHEDULE_S = (0, 5, 5 * 60, 30 * 60, 2 * 3600, 5 * 3600, 10 * 3600, 10 * 3600)
REORDER_FLUSH_S = 0.5  # a reorder window that does not fill up is released after this long
SEND_TIMEOUT_S = 10.0


def new_webhook_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass(order=True)
class _Delivery:
    due: float
    order: int
    msg_id: str = field(compare=False)
    body: str = field(compare=False)
    event_type: str = field(compare=False)
    attempt: int = field(compare=False, default=0)


class WebhookSender:
    def __init__(self, secret: str, url: str | None, faults: FaultInjector, retry_time_scale: float = 1.0,
                 seed: int = 0):
        self._webhook = Webhook(secret)
        self.url = url
        self.faults = faults
        self.scale = retry_time_scale if retry_time_scale > 0 else 1.0
        self._rng = random.Random(f"webhooks:{seed}")
        self._cond = threading.Condition()
        self._heap: list[_Delivery] = []
        self._order = itertools.count()
        self._reorder: list[_Delivery] = []
        self._reorder_since = 0.0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.attempts: deque[dict] = deque(maxlen=2000)  # recent attempts, for the control API and tests
        self.counts = {"published": 0, "delivered": 0, "failed_attempts": 0, "dropped": 0, "duplicated": 0,
                       "gave_up": 0}

    # --- producer side ----------------------------------------------------------------------------------------------

    def set_url(self, url: str | None) -> None:
        with self._cond:
            self.url = url or None
            self._cond.notify()

    def publish(self, events: list[dict]) -> None:
        """Queue events for delivery (nothing is queued while no endpoint is configured, as in Scalekit)."""
        if not events:
            return
        f = self.faults.faults
        now = time.monotonic()
        with self._cond:
            if not self.url:
                return
            for event in events:
                self.counts["published"] += 1
                if f.webhook_drop_rate and self._rng.random() < f.webhook_drop_rate:
                    self.counts["dropped"] += 1
                    continue
                body = json.dumps(event, separators=(",", ":"))
                msg_id = "msg_" + secrets.token_urlsafe(18)
                due = now + f.webhook_delay_ms / 1000.0
                copies = 1
                if f.webhook_duplicate_rate and self._rng.random() < f.webhook_duplicate_rate:
                    copies = 2
                    self.counts["duplicated"] += 1
                for i in range(copies):
                    d = _Delivery(due + 0.05 * i, next(self._order), msg_id, body, event["type"])
                    if f.webhook_reorder_window > 1:
                        if not self._reorder:
                            self._reorder_since = now
                        self._reorder.append(d)
                        if len(self._reorder) >= f.webhook_reorder_window:
                            self._release_reorder()
                    else:
                        heapq.heappush(self._heap, d)
            self._cond.notify()

    def _release_reorder(self) -> None:
        batch, self._reorder = self._reorder, []
        due = max(d.due for d in batch)
        self._rng.shuffle(batch)
        for d in batch:
            d.due = due
            d.order = next(self._order)
            heapq.heappush(self._heap, d)

    def pending(self) -> int:
        with self._cond:
            return len(self._heap) + len(self._reorder)

    def status(self) -> dict:
        with self._cond:
            return {"url": self.url, "pending": len(self._heap) + len(self._reorder), **self.counts,
                    "recent_attempts": list(self.attempts)[-50:]}

    # --- sender thread ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="emulator-webhooks", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def _next_due(self) -> _Delivery | None:
        """Wait for the next delivery that is due (None when stopping)."""
        with self._cond:
            while not self._stopping:
                now = time.monotonic()
                if self._reorder and now - self._reorder_since >= REORDER_FLUSH_S:
                    self._release_reorder()
                wait = None
                if self._heap:
                    if self._heap[0].due <= now and self.url:
                        return heapq.heappop(self._heap)
                    wait = max(0.0, self._heap[0].due - now) if self.url else None
                if self._reorder:
                    flush_in = self._reorder_since + REORDER_FLUSH_S - now
                    wait = flush_in if wait is None else min(wait, flush_in)
                self._cond.wait(timeout=None if wait is None else max(wait, 0.001))
            return None

    def _run(self) -> None:
        with httpx.Client(timeout=SEND_TIMEOUT_S, follow_redirects=False) as client:
            while True:
                delivery = self._next_due()
                if delivery is None:
                    return
                ok, outcome = self._send(client, delivery)
                with self._cond:
                    self.attempts.append({"msg_id": delivery.msg_id, "type": delivery.event_type,
                                          "attempt": delivery.attempt + 1, "outcome": outcome})
                    if ok:
                        self.counts["delivered"] += 1
                        continue
                    self.counts["failed_attempts"] += 1
                    delivery.attempt += 1
                    if delivery.attempt >= len(RETRY_SCHEDULE_S):
                        self.counts["gave_up"] += 1
                        continue
                    delivery.due = time.monotonic() + RETRY_SCHEDULE_S[delivery.attempt] / self.scale
                    delivery.order = next(self._order)
                    heapq.heappush(self._heap, delivery)

    def _send(self, client: httpx.Client, d: _Delivery) -> tuple[bool, str]:
        url = self.url
        if not url:
            return False, "no endpoint"
        now = dt.datetime.now(dt.timezone.utc)
        headers = {
            "content-type": "application/json",
            "user-agent": "Scalekit-Webhooks (scim-pipeline emulator)",
            "webhook-id": d.msg_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": self._webhook.sign(d.msg_id, now, d.body),
        }
        try:
            response = client.post(url, content=d.body.encode(), headers=headers)
        except httpx.HTTPError as exc:
            return False, type(exc).__name__
        return 200 <= response.status_code < 300, str(response.status_code)
