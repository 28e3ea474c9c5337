"""The ``changes`` delivery protocol (docs/delivery-protocol.md): change batches POSTed to the application.

``ApplicationClient`` sends one organization's batch, signed with Standard Webhooks, under an ``Idempotency-Key``
derived from the batch's content, and retries what is worth retrying (the package's ``RetryPolicy``).
``send_changes`` sends one organization's changes batch after batch, in the order the protocol promises
(``provisioning.ordering``), and adapts: a batch the application finds too large or too slow is halved.

Every change that is not answered comes back with what is known of it: whether a request carrying it may have been
applied (``in_doubt``), whether it was sent at all, and how long the application asked to be left alone
(``retry_after``), so that the ledger schedules it instead of this process sleeping.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import random
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Optional, Protocol

import httpx
from standardwebhooks import Webhook

from scim_pipeline.lib.retry import RetryPolicy
from scim_pipeline.provisioning.ordering import order_changes

CHANGES_PATH = "/scim/changes"


class DeliveryError(Exception):
    """A batch that did not reach the application; its message never holds the secret.

    A client that sends a batch in several requests (the SCIM 2.0 protocol: one request per change) sets
    ``answered``, the results of the changes answered before the failure, and ``unsent``, the ids of the batch's
    changes it never sent; the rest of the batch shares the error's fate."""

    answered: tuple["ChangeResult", ...] = ()
    unsent: frozenset[str] = frozenset()


class DeliveryUnavailable(DeliveryError):
    """The application stayed unreachable, slow, rate-limited or failing for the whole retry budget, or asked for a
    longer wait (``retry_after``, seconds) than the client spends within a request: try later. ``maybe_applied``:
    some attempt may have been applied (a 5xx, a timeout, a connection lost after sending)."""

    def __init__(self, message: str, retry_after: float | None = None, maybe_applied: bool = True):
        super().__init__(message)
        self.retry_after = retry_after
        self.maybe_applied = maybe_applied


class BatchTooLarge(DeliveryError):
    """The application refused the batch as too large (413), or did not answer a batch of several changes in time
    (``maybe_applied``: it may still have applied it): send it in smaller parts. ``detail`` is the error a single
    change is rejected with."""

    def __init__(self, message: str, detail: str, maybe_applied: bool = False):
        super().__init__(message)
        self.detail = detail
        self.maybe_applied = maybe_applied


class TryAgain(Exception):
    """One attempt that is worth repeating (429, 5xx, timeout, connection error, unreadable 2xx)."""

    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.retry_after = retry_after


@dataclass
class Attempts:
    """What the attempts of one request have shown: whether any may have been applied (a 5xx, a timeout, a
    connection lost after sending), so that its changes are in doubt."""

    maybe_applied: bool = False


class DeliveryRejected(DeliveryError):
    """The application refused the request itself (a 4xx other than 408, 413 and 429): nothing of it was applied,
    and the same request cannot succeed now. ``detail`` (``HTTP <status>: <body>``) is the error its changes are
    rejected with."""

    def __init__(self, status_code: int, message: str, detail: str | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.detail = detail or f"HTTP {status_code}"


@dataclass(frozen=True)
class ChangeResult:
    change_id: str
    status: str  # "applied" | "rejected" | "failed" (not answered, or the batch was not delivered)
    error: Optional[str] = None
    # For a failed change, what the ledger needs to schedule it (not part of what happened to it, so not compared):
    in_doubt: bool = field(default=False, compare=False)  # a request carrying it may have been applied
    sent: bool = field(default=True, compare=False)  # False: never sent (an earlier batch was not delivered)
    retry_after: Optional[float] = field(default=None, compare=False)  # seconds the application asked to wait

    def as_dict(self) -> dict[str, Any]:
        return {"change_id": self.change_id, "status": self.status, "error": self.error}


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


class RetryingClient:
    """What both delivery protocols' clients share: one HTTP connection pool to the application (close it, or use
    ``with``), and one request retried by the package's ``RetryPolicy`` where retrying is worth it."""

    def __init__(
        self,
        timeout: float = 10.0,
        max_attempts: int = 5,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        max_retry_after: float = 10.0,
    ):
        """``max_retry_after``: the longest ``Retry-After`` slept on within a request; a longer one ends the send
        (``DeliveryUnavailable.retry_after``), and the ledger schedules the batch for then."""
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.max_attempts = max_attempts
        self.max_retry_after = max_retry_after
        self.retry = RetryPolicy(attempts=max_attempts, base_s=backoff_base, max_delay_s=backoff_max)
        self._sleep = sleep
        self._rng = rng or random.Random()
        # trust_env=False: the application is reached directly, not through whatever proxy the shell names.
        self._http = httpx.Client(timeout=timeout, trust_env=False)

    def close(self) -> None:
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def retried(self, what: str, attempt: Callable[[Attempts], Any]) -> Any:
        """``attempt``'s answer, retried while it raises TryAgain (honouring a Retry-After up to
        ``max_retry_after``); DeliveryUnavailable naming ``what`` once the budget is spent or a longer wait is asked."""
        seen = Attempts()

        def too_long(exc: BaseException) -> bool:
            wait = getattr(exc, "retry_after", None)
            return wait is not None and wait > self.max_retry_after

        try:
            return self.retry.call(lambda: attempt(seen),
                                   retry_if=lambda exc: isinstance(exc, TryAgain) and not too_long(exc),
                                   delay_hint=lambda exc: exc.retry_after, sleep=self._sleep, rng=self._rng)
        except TryAgain as exc:
            if too_long(exc):
                raise DeliveryUnavailable(f"{what} not delivered: {exc}; the application asked to wait "
                                          f"{exc.retry_after:.0f}s", exc.retry_after, seen.maybe_applied) from None
            raise DeliveryUnavailable(f"{what} not delivered after {self.max_attempts} attempts: {exc}", None,
                                      seen.maybe_applied) from None


class ApplicationClient(RetryingClient):
    """Sends change batches to one application."""

    def __init__(self, url: str, secret: str, **options: Any):
        """``options``: those of ``RetryingClient``."""
        super().__init__(**options)
        self.url = url.rstrip("/")
        self._webhook = Webhook(secret)

    def __repr__(self) -> str:
        return f"ApplicationClient(url={self.url!r})"

    # The delivery calls these around each organization's send, inside its short warehouse transactions; a protocol
    # that keeps state in the warehouse (the SCIM 2.0 protocol: the ids the application gave) reads and writes it
    # there. The `changes` protocol keeps none.
    def read_state(self, con: Any, organization_id: str) -> None:
        pass

    def write_state(self, con: Any, organization_id: str) -> None:
        pass

    def send_batch(self, organization_id: str, changes: list[dict]) -> list[ChangeResult]:
        """Deliver one batch; one result per change, in the order given. Raises DeliveryUnavailable when the retry
        budget is spent or the application asks for a long wait, DeliveryRejected when it refuses the request, and
        BatchTooLarge when it finds the batch too large (413) or does not answer a batch of several changes in time
        (a smaller batch is the better retry)."""
        wire = [_wire_change(c) for c in changes]
        if not wire:
            return []
        bid = _batch_id_of(organization_id, changes)
        body = json.dumps(
            {"batch_id": bid, "organization_id": organization_id, "changes": wire}, separators=(",", ":")
        ).encode()
        answer = self._post(bid, body, len(wire))
        return _results(wire, answer)

    def _post(self, bid: str, body: bytes, size: int) -> Any:
        endpoint = self.url + CHANGES_PATH

        def attempt(seen: Attempts) -> Any:
            try:
                # Signed afresh on every attempt: a retry after a long wait must not carry a stale timestamp.
                response = self._http.post(endpoint, content=body, headers=self._headers(bid, body))
            except httpx.TimeoutException as exc:
                reason = f"timed out ({type(exc).__name__})"
                if isinstance(exc, httpx.ConnectTimeout):  # never reached the application
                    raise TryAgain(reason) from exc
                seen.maybe_applied = True
                if size > 1:
                    raise BatchTooLarge(f"{endpoint}: batch {bid} of {size} changes {reason}", reason, True) from exc
                raise TryAgain(reason) from exc
            except httpx.TransportError as exc:
                seen.maybe_applied = seen.maybe_applied or not isinstance(exc, httpx.ConnectError)
                raise TryAgain(f"connection failed: {exc or type(exc).__name__}") from exc
            status = response.status_code
            if 200 <= status < 300:
                try:
                    return response.json()
                except ValueError:
                    # Applied or not, a resend is safe (idempotency), and this may be a garbled answer.
                    seen.maybe_applied = True
                    raise TryAgain(f"HTTP {status} with a body that is not JSON") from None
            detail = f"HTTP {status}: {_snippet(response)}"
            if status == 413 or (status == 408 and size > 1):
                raise BatchTooLarge(f"{endpoint} refused batch {bid} of {size} changes: {detail}", detail)
            if status in (408, 429) or status >= 500:
                # a 5xx may come after the application committed
                seen.maybe_applied = seen.maybe_applied or status >= 500
                raise TryAgain(detail, parse_retry_after(response.headers.get("retry-after")))
            raise DeliveryRejected(status, f"{endpoint} refused batch {bid}: {detail}", detail)

        return self.retried(f"{endpoint}: batch {bid}", attempt)

    def _headers(self, bid: str, body: bytes) -> dict[str, str]:
        now = datetime.now(tz=timezone.utc)
        return {
            "content-type": "application/json",
            "idempotency-key": bid,
            "webhook-id": bid,  # the same message id on every attempt, as Standard Webhooks asks of retries
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": self._webhook.sign(bid, now, body.decode()),
        }


def _snippet(response: httpx.Response, limit: int = 300) -> str:
    text = response.text.strip().replace("\n", " ")
    return text[:limit] + ("..." if len(text) > limit else "")


def _results(sent: list[dict], answer: Any) -> list[ChangeResult]:
    """One result per sent change; anything unanswered or unreadable counts as failed, in doubt (it will be sent
    again)."""
    answered: dict[str, ChangeResult] = {}
    rows = answer.get("results") if isinstance(answer, dict) else None
    for row in rows if isinstance(rows, list) else []:
        if not isinstance(row, dict) or not isinstance(row.get("change_id"), str):
            continue
        status, error = row.get("status"), row.get("error")
        error = None if error is None else str(error)
        if status not in ("applied", "rejected"):
            status, error = "failed", f"unexpected status {status!r} in the application's answer"
        answered.setdefault(row["change_id"], ChangeResult(row["change_id"], status, error, in_doubt=True))
    # The application took the batch: a change it did not answer for clearly may have been applied all the same.
    return [
        answered.get(c["change_id"])
        or ChangeResult(c["change_id"], "failed", "no result in the application's answer", in_doubt=True)
        for c in sent
    ]


class DeliveryClient(Protocol):
    """What the delivery needs of an application client: ``ApplicationClient`` (the ``changes`` protocol) and
    ``scim2_protocol.Scim2Client`` implement it."""

    def send_batch(self, organization_id: str, changes: list[dict]) -> list[ChangeResult]: ...

    def read_state(self, con: Any, organization_id: str) -> None: ...

    def write_state(self, con: Any, organization_id: str) -> None: ...

    def close(self) -> None: ...


def send_changes(
    client: DeliveryClient, organization_id: str, changes: Iterable[dict], batch_size: int = 500
) -> list[ChangeResult]:
    """Send one organization's changes in protocol order, batch after batch; one result per change.

    A batch the application finds too large (413) or does not answer in time is halved, down to single changes, and
    the next batches keep the size that went through; a single change still too large is rejected with that error.
    A batch the application refuses (another 4xx) is rejected as a whole. Delivery stops at the first batch that is
    not delivered or refused (later ones may depend on it, e.g. memberships on a create): its changes are
    ``failed``, in doubt if a request may have been applied, and every later change is ``failed`` unsent."""
    if batch_size < 1:
        raise ValueError("batch size must be at least 1")
    ordered = order_changes(changes)
    results: list[ChangeResult] = []
    start, size, largest_sent = 0, batch_size, 0
    maybe_applied: set[str] = set()  # sent in a batch that timed out: the application may have applied them
    while start < len(ordered):
        chunk = ordered[start : start + size]
        try:
            answered = client.send_batch(organization_id, chunk)
        except BatchTooLarge as exc:
            if exc.maybe_applied:
                maybe_applied.update(c["change_id"] for c in chunk)
            if len(chunk) > 1:
                size = len(chunk) // 2
                continue
            answered = [ChangeResult(chunk[0]["change_id"], "rejected", exc.detail)]
            size = largest_sent or batch_size  # that one change was the trouble, not the size that went through
        except DeliveryRejected as exc:
            results.extend(exc.answered)
            answered_ids = {r.change_id for r in exc.answered}
            results.extend(ChangeResult(c["change_id"], "rejected", exc.detail) for c in chunk
                           if c["change_id"] not in answered_ids)
            results.extend(_unsent(ordered[start + len(chunk) :], exc, maybe_applied))
            break
        except DeliveryError as exc:
            retry_after = exc.retry_after if isinstance(exc, DeliveryUnavailable) else None
            in_doubt = exc.maybe_applied if isinstance(exc, DeliveryUnavailable) else True
            results.extend(exc.answered)
            answered_ids = {r.change_id for r in exc.answered}
            rest = [c for c in chunk if c["change_id"] not in answered_ids]
            results.extend(ChangeResult(c["change_id"], "failed", str(exc), retry_after=retry_after,
                                        in_doubt=in_doubt or c["change_id"] in maybe_applied) for c in rest
                           if c["change_id"] not in exc.unsent)
            results.extend(_unsent([c for c in rest if c["change_id"] in exc.unsent], exc, maybe_applied))
            results.extend(_unsent(ordered[start + len(chunk) :], exc, maybe_applied))
            break
        else:
            largest_sent = max(largest_sent, len(chunk))
        results.extend(answered)
        start += len(chunk)
    return results


def _unsent(changes: list[dict], cause: Exception, maybe_applied: set[str]) -> list[ChangeResult]:
    """The changes after a batch not delivered. Those already sent in a batch that timed out count as attempted and
    in doubt; the others were never sent."""
    results = []
    for c in changes:
        if c["change_id"] in maybe_applied:
            results.append(ChangeResult(c["change_id"], "failed", f"timed out, then not sent again ({cause})",
                                        in_doubt=True))
        else:
            results.append(ChangeResult(c["change_id"], "failed", f"not sent: an earlier batch was not delivered "
                                        f"({cause})", sent=False))
    return results
