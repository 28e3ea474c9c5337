"""Standard Webhooks signatures as Scalekit sends them, checked by the ``standardwebhooks`` library.

Headers ``webhook-id``, ``webhook-timestamp`` (integer Unix seconds) and ``webhook-signature`` (space-separated
``<scheme>,<base64>`` entries); the signed content is ``{id}.{timestamp}.{body}``. The library refuses a timestamp
more than 5 minutes old or ahead, and looks for a ``v1`` entry equal, compared in constant time, to the HMAC-SHA256
of that content under one secret. ``WebhookVerifier`` adds what it does not do: several secrets, so that one can be
rotated without downtime; integer timestamps only; and a ``SignatureError``, never another exception, for headers it
cannot parse.
"""

from __future__ import annotations

from typing import Mapping

from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError


class SignatureError(Exception):
    """The request is not a genuine, fresh webhook. The message is a short reason, safe to log (no secret)."""


class WebhookVerifier:
    """Checks headers and body against every configured ``whsec_`` secret; any one of them signing is enough."""

    def __init__(self, secrets: list[str]):
        if not secrets:
            raise ValueError("at least one webhook secret is required")
        self._webhooks = [Webhook(secret) for secret in secrets]

    def verify(self, headers: Mapping[str, str], body: bytes) -> str:
        """The webhook id of a genuine request, else SignatureError."""
        webhook_id = headers.get("webhook-id")
        timestamp = headers.get("webhook-timestamp")
        signature = headers.get("webhook-signature")
        if not (webhook_id and timestamp and signature):
            raise SignatureError("missing webhook headers")
        # The library reads the timestamp with float() and signs the whole seconds it comes to, so "1.8e9",
        # " 1800000000" or non-ASCII digits would pass for a signature over "1800000000".
        if not (timestamp.isascii() and timestamp.isdigit()):
            raise SignatureError("malformed webhook-timestamp")
        try:
            # The library signs text: for UTF-8, decoding and its re-encoding give back exactly the bytes received.
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise SignatureError("body is not UTF-8") from None

        reason = "malformed webhook-signature"
        # One entry at a time: the library gives up on the whole header at the first entry it cannot split or
        # decode, and a sender mid-rotation may add entries of its own (other schemes, other keys).
        entries = signature.split()
        for webhook in self._webhooks:
            for entry in entries:
                one = {"webhook-id": webhook_id, "webhook-timestamp": timestamp, "webhook-signature": entry}
                try:
                    webhook.verify(text, one, json_parse=False)
                    return webhook_id
                except WebhookVerificationError as exc:  # stale or future timestamp, or no match under this secret
                    reason = str(exc)
                except ValueError:  # not "<scheme>,<base64>": the library cannot read this entry
                    continue
        raise SignatureError(reason)
