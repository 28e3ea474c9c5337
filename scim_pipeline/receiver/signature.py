"""Standard Webhooks signatures, as Scalekit sends them.

Headers ``webhook-id``, ``webhook-timestamp`` (integer Unix seconds) and ``webhook-signature`` (space-separated
``<scheme>,<base64>`` entries). The signed content is ``{id}.{timestamp}.{raw body}`` and the HMAC-SHA256 key is the
base64 part of a ``whsec_...`` secret. Verification works on the raw body bytes (never a re-serialized JSON) and
accepts any ``v1`` signature made with any configured secret, so that secrets can be rotated without downtime.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from typing import Mapping

SECRET_PREFIX = "whsec_"
DEFAULT_TOLERANCE_S = 300


class SignatureError(Exception):
    """The request is not a genuine, fresh webhook. The message is a short reason, safe to log (no secret)."""


def secret_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_<base64>`` secret."""
    encoded = secret[len(SECRET_PREFIX):] if secret.startswith(SECRET_PREFIX) else secret
    try:
        # Some producers drop base64 padding; extra '=' is ignored by the decoder.
        key = base64.b64decode(encoded + "==")
    except (binascii.Error, ValueError) as exc:
        raise ValueError("webhook secret is not base64 after whsec_") from exc
    if not key:
        raise ValueError("webhook secret is empty")
    return key


def _digest(key: bytes, webhook_id: str, timestamp: str, body: bytes) -> bytes:
    return hmac.new(key, b"%s.%s.%s" % (webhook_id.encode(), timestamp.encode(), body), hashlib.sha256).digest()


def sign(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value (one ``v1`` entry) for ``body``."""
    digest = _digest(secret_key(secret), webhook_id, str(int(timestamp)), body)
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(secret: str, webhook_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    """The three Standard Webhooks headers for ``body``, signed now unless ``timestamp`` is given."""
    ts = int(time.time()) if timestamp is None else int(timestamp)
    signature = sign(secret, webhook_id, ts, body)
    return {"webhook-id": webhook_id, "webhook-timestamp": str(ts), "webhook-signature": signature}


class Verifier:
    """Checks headers and raw body against every configured secret."""

    def __init__(self, secrets: list[str], tolerance_s: float = DEFAULT_TOLERANCE_S):
        if not secrets:
            raise ValueError("at least one webhook secret is required")
        self._keys = [secret_key(s) for s in secrets]
        self.tolerance_s = tolerance_s

    def verify(self, headers: Mapping[str, str], body: bytes, now: float | None = None) -> str:
        """Return the webhook id of a genuine request, else raise SignatureError."""
        webhook_id = headers.get("webhook-id")
        timestamp = headers.get("webhook-timestamp")
        signatures = headers.get("webhook-signature")
        if not (webhook_id and timestamp and signatures):
            raise SignatureError("missing webhook headers")
        if not timestamp.isascii() or not timestamp.isdigit():
            raise SignatureError("malformed webhook-timestamp")
        now = time.time() if now is None else now
        if abs(now - int(timestamp)) > self.tolerance_s:
            raise SignatureError("webhook-timestamp outside tolerance")

        offered = []
        for entry in signatures.split():
            scheme, _, value = entry.partition(",")
            if scheme != "v1":  # other schemes (e.g. asymmetric v1a) are not ours to check
                continue
            try:
                offered.append(base64.b64decode(value, validate=True))
            except (binascii.Error, ValueError):
                continue
        if not offered:
            raise SignatureError("no v1 signature")
        for key in self._keys:
            expected = _digest(key, webhook_id, timestamp, body)
            # compare_digest: the time taken does not reveal how many leading bytes matched.
            if any(hmac.compare_digest(expected, sig) for sig in offered):
                return webhook_id
        raise SignatureError("signature mismatch")
