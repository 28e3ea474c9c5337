"""What Scalekit's edge enforces before any API logic: client credentials, bearer tokens, and (for tests) injected
faults: latency, rate limiting, unavailability and token expiry, plus the webhook faults the sender applies."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class Credentials:
    client_id: str
    client_secret: str

    @classmethod
    def for_seed(cls, seed: int) -> "Credentials":
        # Derived from the seed so a restarted emulator keeps accepting a client configured earlier.
        digest = hashlib.sha256(f"scim-pipeline-emulator-client:{seed}".encode()).hexdigest()
        return cls(client_id=f"skc_{int(digest[:14], 16)}", client_secret=f"test_{digest[14:62]}")

    def matches(self, client_id: str, client_secret: str) -> bool:
        return hmac.compare_digest(client_id.encode(), self.client_id.encode()) and hmac.compare_digest(
            client_secret.encode(), self.client_secret.encode())


class Tokens:
    """Opaque bearer tokens with an expiry; ``expire_all`` makes every token issued so far invalid at once."""

    def __init__(self, ttl_seconds: int):
        self.ttl = ttl_seconds
        self._lock = threading.Lock()
        self._expiry: dict[str, float] = {}

    def issue(self) -> str:
        token = secrets.token_urlsafe(32)
        now = time.monotonic()
        with self._lock:
            # Forget long-expired tokens so a client refreshing all day does not grow this without bound.
            if len(self._expiry) > 10_000:
                self._expiry = {t: e for t, e in self._expiry.items() if e > now}
            self._expiry[token] = now + self.ttl
        return token

    def valid(self, token: str) -> bool:
        expiry = self._expiry.get(token)
        return expiry is not None and expiry > time.monotonic()

    def expire_all(self) -> None:
        with self._lock:
            self._expiry = dict.fromkeys(self._expiry, 0.0)


@dataclass
class EmulatorFaults:
    """The ``POST /_emulator/faults`` settings (docs/emulator.md); 0/false means off."""

    latency_ms: int = 0
    rate_limit_every: int = 0
    unavailable_every: int = 0
    malformed_page_every: int = 0  # every Nth page of directory users is cut short: a reply that is not protobuf
    expire_tokens: bool = False
    webhook_drop_rate: float = 0.0
    webhook_duplicate_rate: float = 0.0
    webhook_reorder_window: int = 0
    webhook_delay_ms: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


class FaultError(ValueError):
    pass


class FaultInjector:
    """Holds the current faults and counts gRPC calls, so that 'every Nth call' is exact and reproducible."""

    def __init__(self, tokens: Tokens):
        self.tokens = tokens
        self.faults = EmulatorFaults()
        self._lock = threading.Lock()
        self._calls = 0
        self._user_pages = 0

    def update(self, settings: dict) -> EmulatorFaults:
        known = {f.name: f for f in fields(EmulatorFaults)}
        new = EmulatorFaults(**self.faults.as_dict())
        for key, value in settings.items():
            if key not in known:
                raise FaultError(f"unknown fault {key!r}; known: {', '.join(known)}")
            kind = known[key].type
            if kind == "bool":
                if not isinstance(value, bool) and value not in (0, 1):
                    raise FaultError(f"{key} must be true or false")
                value = bool(value)
            elif kind == "int":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value != int(value):
                    raise FaultError(f"{key} must be a non-negative integer")
                value = int(value)
            else:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                    raise FaultError(f"{key} must be a number between 0 and 1")
                value = float(value)
            setattr(new, key, value)
        with self._lock:
            if new.expire_tokens:
                # A one-shot action: every token issued until now expires; tokens issued later are fine.
                self.tokens.expire_all()
                new.expire_tokens = False
            self.faults = new
            self._calls = self._user_pages = 0  # "every Nth" counts from the moment the fault is set
        return new

    def on_call(self) -> tuple[str | None, float]:
        """For one gRPC call: the failure to answer with (``"RESOURCE_EXHAUSTED"``/``"UNAVAILABLE"``) or None, and
        the latency to add in seconds."""
        f = self.faults
        with self._lock:
            self._calls += 1
            n = self._calls
        failure = None
        if f.unavailable_every and n % f.unavailable_every == 0:
            failure = "UNAVAILABLE"
        elif f.rate_limit_every and n % f.rate_limit_every == 0:
            failure = "RESOURCE_EXHAUSTED"
        return failure, f.latency_ms / 1000.0

    def malformed(self, page: bytes) -> bytes:
        """A page of directory users as sent: cut in the middle of a user when the fault says so."""
        every = self.faults.malformed_page_every
        if not every:
            return page
        with self._lock:
            self._user_pages += 1
            n = self._user_pages
        return page[:len(page) // 2] if n % every == 0 else page
