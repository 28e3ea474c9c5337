"""Delivery of change sets to the application (SPEC "Application delivery protocol").

``ApplicationClient`` sends one organization's batch, signed with Standard Webhooks, under an ``Idempotency-Key``
derived from the batch's content, and retries what is worth retrying. ``order_changes`` and ``batches`` put an
organization's changes in the order the protocol promises; ``deliver_changes`` ties the three together for a delivery
run. ``ApplicationResource`` is the thin Dagster face of the client.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import random
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Optional

import dagster as dg
import httpx
from standardwebhooks import Webhook

from scim_pipeline.config import settings

CHANGES_PATH = "/scim/changes"


class DeliveryError(Exception):
    """A batch that did not reach the application; its message never holds the secret."""


class DeliveryUnavailable(DeliveryError):
    """The application stayed unreachable, slow, rate-limited or failing for the whole retry budget: try later."""


class DeliveryRejected(DeliveryError):
    """The application refused the request itself (a 4xx other than 429): retrying the same request cannot help."""

    def __init__(self, status_code: int, message: str):
        super().__init__(message)
        self.status_code = status_code


@dataclass(frozen=True)
class ChangeResult:
    change_id: str
    status: str  # "applied" | "rejected" | "failed" (not answered, or the batch was not delivered)
    error: Optional[str] = None

    def as_dict(self) -> dict[str, Any]:
        return {"change_id": self.change_id, "status": self.status, "error": self.error}


# -- order ------------------------------------------------------------------------------------------------------

# SPEC order within one organization: creates and reactivations; then updates, memberships added, roles granted;
# then memberships removed, roles revoked; then deactivations and deletes. Within a tier the finer rank below puts a
# user's attributes before the memberships and roles that name it.
DELIVERY_RANK = {
    ("user", "create"): 0,
    ("user", "reactivate"): 0,
    ("user", "update"): 1,
    ("membership", "add"): 2,
    ("role", "grant"): 3,
    ("membership", "remove"): 4,
    ("role", "revoke"): 5,
    ("user", "deactivate"): 6,
    ("user", "delete"): 7,
}
_UNKNOWN_RANK = 8  # sent last; the application rejects them on their own


def order_changes(changes: Iterable[dict]) -> list[dict]:
    """One organization's changes in delivery order; a stable sort, so the caller's order holds within a rank."""
    return sorted(changes, key=lambda c: DELIVERY_RANK.get((c.get("entity"), c.get("op")), _UNKNOWN_RANK))


def batches(changes: Iterable[dict], size: int = 500) -> list[list[dict]]:
    """``order_changes``, cut into consecutive batches of at most ``size``. Send them in this order, one after the
    other, and stop at the first that is not delivered (``deliver_changes`` does)."""
    if size < 1:
        raise ValueError("batch size must be at least 1")
    ordered = order_changes(changes)
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


def batch_id(organization_id: str, change_ids: Iterable[str]) -> str:
    """Stable for the same organization and set of changes, so a resent batch carries the same Idempotency-Key."""
    digest = hashlib.sha256("\n".join([organization_id, *sorted(change_ids)]).encode()).hexdigest()
    return f"batch_{digest[:40]}"


def _batch_id_of(organization_id: str, changes: list[dict]) -> str:
    """The batch id of changes as given. Ledger rows carry ``attempts``; it joins the id, so that retries within one
    send share a key while a resend on a later run (the ledger recorded the earlier outcome) is a new request: the
    application judges a once-rejected change afresh instead of answering from a stored response. Nothing is applied
    twice either way: the application applies each change_id once."""
    return batch_id(organization_id, [
        c["change_id"] if c.get("attempts") is None else f"{c['change_id']}#{c['attempts']}" for c in changes
    ])


def _wire_change(change: dict) -> dict:
    """A change as the protocol sends it. Ledger rows (``entity_key``, ``payload`` as JSON text) are accepted too."""
    change_id = change.get("change_id")
    if not isinstance(change_id, str) or not change_id:
        raise ValueError(f"change without a change_id: {change!r}")
    data = change.get("data", change.get("payload"))
    if isinstance(data, (str, bytes)):
        data = json.loads(data)
    return {
        "change_id": change_id,
        "entity": change.get("entity"),
        "op": change.get("op"),
        "key": change.get("key", change.get("entity_key")),
        "data": data if data is not None else {},
    }


# -- the client -------------------------------------------------------------------------------------------------


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date); None when absent or invalid."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


class ApplicationClient:
    """Sends change batches to one application. Reuses one HTTP connection pool; close it (or use ``with``)."""

    def __init__(
        self,
        url: str,
        secret: str,
        timeout: float = 10.0,
        max_attempts: int = 5,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ):
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.url = url.rstrip("/")
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._webhook = Webhook(secret)
        # trust_env=False: the application is reached directly, not through whatever proxy the shell names.
        self._http = httpx.Client(timeout=timeout, trust_env=False)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "ApplicationClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ApplicationClient(url={self.url!r})"

    def send_batch(self, organization_id: str, changes: list[dict]) -> list[ChangeResult]:
        """Deliver one batch; one result per change, in the order given. Raises DeliveryUnavailable when the retry
        budget is spent, DeliveryRejected when the application refuses the request."""
        wire = [_wire_change(c) for c in changes]
        if not wire:
            return []
        bid = _batch_id_of(organization_id, changes)
        body = json.dumps(
            {"batch_id": bid, "organization_id": organization_id, "changes": wire}, separators=(",", ":")
        ).encode()
        answer = self._post(bid, body)
        return _results(wire, answer)

    def _post(self, bid: str, body: bytes) -> Any:
        endpoint = self.url + CHANGES_PATH
        last_error = "no attempt made"
        for attempt in range(1, self.max_attempts + 1):
            retry_after: float | None = None
            try:
                # Signed afresh on every attempt: a retry after a long wait must not carry a stale timestamp.
                response = self._http.post(endpoint, content=body, headers=self._headers(bid, body))
            except httpx.TimeoutException as exc:
                last_error = f"timed out ({type(exc).__name__})"
            except httpx.TransportError as exc:
                last_error = f"connection failed: {exc or type(exc).__name__}"
            else:
                status = response.status_code
                if 200 <= status < 300:
                    try:
                        return response.json()
                    except ValueError:
                        # Applied or not, a resend is safe (idempotency), and this may be a garbled answer.
                        last_error = f"HTTP {status} with a body that is not JSON"
                elif status == 429 or status >= 500:
                    last_error = f"HTTP {status}: {_snippet(response)}"
                    retry_after = parse_retry_after(response.headers.get("retry-after"))
                else:
                    raise DeliveryRejected(status, f"{endpoint} refused batch {bid}: HTTP {status}: {_snippet(response)}")
            if attempt < self.max_attempts:
                self._sleep(self._delay(attempt, retry_after))
        raise DeliveryUnavailable(f"{endpoint}: batch {bid} not delivered after {self.max_attempts} attempts: {last_error}")

    def _headers(self, bid: str, body: bytes) -> dict[str, str]:
        now = datetime.now(tz=timezone.utc)
        return {
            "content-type": "application/json",
            "idempotency-key": bid,
            "webhook-id": bid,  # the same message id on every attempt, as Standard Webhooks asks of retries
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": self._webhook.sign(bid, now, body.decode()),
        }

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.backoff_max)
        # Exponential backoff with full jitter: senders that failed together do not retry together.
        return self._rng.uniform(0.0, min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1)))


def _snippet(response: httpx.Response, limit: int = 300) -> str:
    text = response.text.strip().replace("\n", " ")
    return text[:limit] + ("..." if len(text) > limit else "")


def _results(sent: list[dict], answer: Any) -> list[ChangeResult]:
    """One result per sent change; anything unanswered or unreadable counts as failed (it will be sent again)."""
    answered: dict[str, ChangeResult] = {}
    rows = answer.get("results") if isinstance(answer, dict) else None
    for row in rows if isinstance(rows, list) else []:
        if not isinstance(row, dict) or not isinstance(row.get("change_id"), str):
            continue
        status, error = row.get("status"), row.get("error")
        error = None if error is None else str(error)
        if status not in ("applied", "rejected"):
            status, error = "failed", f"unexpected status {status!r} in the application's answer"
        answered.setdefault(row["change_id"], ChangeResult(row["change_id"], status, error))
    return [
        answered.get(c["change_id"]) or ChangeResult(c["change_id"], "failed", "no result in the application's answer")
        for c in sent
    ]


def deliver_changes(
    client: ApplicationClient, organization_id: str, changes: Iterable[dict], batch_size: int = 500
) -> list[ChangeResult]:
    """Send one organization's changes in protocol order, batch after batch. When a batch is not delivered, it and
    every later batch are ``failed`` with the error (later ones may depend on it, e.g. memberships on a create)."""
    results: list[ChangeResult] = []
    pending = batches(changes, batch_size)
    for i, batch in enumerate(pending):
        try:
            results.extend(client.send_batch(organization_id, batch))
        except DeliveryError as exc:
            for later in pending[i:]:
                results.extend(ChangeResult(c["change_id"], "failed", str(exc)) for c in later)
            break
    return results


# -- Dagster ----------------------------------------------------------------------------------------------------


class ApplicationResource(dg.ConfigurableResource):
    """The application the pipeline delivers to. Unset fields come from the settings (SCIM_PIPELINE_APP_URL,
    SCIM_PIPELINE_APP_SECRET, or the demo application's app.env)."""

    url: Optional[str] = None
    timeout_s: Optional[float] = None
    max_attempts: Optional[int] = None

    def client(self) -> ApplicationClient:
        cfg = settings()
        return ApplicationClient(
            self.url or cfg.app_url(),
            cfg.app_secret(),
            timeout=self.timeout_s or 10.0,
            max_attempts=self.max_attempts or 5,
        )
