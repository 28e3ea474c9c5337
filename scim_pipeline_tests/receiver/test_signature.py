"""The receiver's verifier: the standardwebhooks library, with several secrets, strict timestamps and no exception
but SignatureError. Timestamps are the real clock's, as the library reads it."""

import base64
import time

import pytest

from scim_pipeline.receiver.verify import SignatureError, WebhookVerifier
from scim_pipeline_tests.receiver.helpers import event_body, new_secret, signed, signed_bytes


def test_accepts_reference_signature(secret):
    body = event_body()
    headers = signed(secret, body, "msg_a")
    assert WebhookVerifier([secret]).verify(headers, body) == "msg_a"


def test_accepts_a_signature_computed_without_the_library(secret):
    body = event_body()
    assert WebhookVerifier([secret]).verify(signed_bytes(secret, body, "msg_b"), body) == "msg_b"


def test_signature_is_over_raw_bytes(secret):
    body = b'{"type": "x",   "id": "\\u00e9"}'  # spacing and escapes a re-serialization would change
    headers = signed(secret, body, "msg_c")
    WebhookVerifier([secret]).verify(headers, body)
    with pytest.raises(SignatureError):
        WebhookVerifier([secret]).verify(headers, b'{"type": "x", "id": "\\u00e9"}')


def test_any_configured_secret_any_v1_entry(secret):
    old, other = new_secret(), new_secret()
    body = event_body()
    headers = signed(old, body, "msg_d")
    # Several entries, other schemes and garbage among them, as a producer mid-rotation may send.
    wrong = base64.b64encode(b"x" * 32).decode()
    headers["webhook-signature"] = f"v1a,AAAA v1,{wrong} v1,%%% v1,abc v1 v1,a,b  " + headers["webhook-signature"]
    assert WebhookVerifier([secret, old]).verify(headers, body) == "msg_d"
    with pytest.raises(SignatureError, match="No matching signature"):
        WebhookVerifier([secret, other]).verify(headers, body)


def test_only_the_v1_scheme(secret):
    body = event_body()
    headers = signed(secret, body, "msg_v")
    headers["webhook-signature"] = headers["webhook-signature"].replace("v1,", "v1a,")
    with pytest.raises(SignatureError, match="No matching signature"):
        WebhookVerifier([secret]).verify(headers, body)


# The library compares the header with its clock's fractions of a second, so a timestamp exactly 300 s away is not
# observable: the probes are a second inside and outside, from a clock rounded to the nearest second.
@pytest.mark.parametrize("offset, ok", [(-299, True), (299, True), (-301, False), (301, False), (-3600, False)])
def test_timestamp_tolerance(secret, offset, ok):
    body = event_body()
    headers = signed(secret, body, "msg_e", round(time.time()) + offset)
    if ok:
        WebhookVerifier([secret]).verify(headers, body)
    else:
        with pytest.raises(SignatureError, match="timestamp too (old|new)"):
            WebhookVerifier([secret]).verify(headers, body)


@pytest.mark.parametrize("header", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_missing_header(secret, header):
    body = event_body()
    headers = signed(secret, body, "msg_f")
    del headers[header]
    with pytest.raises(SignatureError, match="missing"):
        WebhookVerifier([secret]).verify(headers, body)


# Each but the last two is read by the library's float() as the very second the signature is over.
@pytest.mark.parametrize("form", ["{ts}.0", " {ts}", "{ts} ", "+{ts}", "{ts:_}", "{ts_e}", "{ts_fullwidth}",
                                  "-5", ""])
def test_malformed_timestamp(secret, form):
    ts = int(time.time())
    value = form.format(ts=ts, ts_e=f"{ts / 1e9:.9f}e9",
                        ts_fullwidth=str(ts).translate({ord("0") + d: 0xFF10 + d for d in range(10)}))
    body = event_body()
    headers = signed(secret, body, "msg_g", ts)
    headers["webhook-timestamp"] = value
    with pytest.raises(SignatureError):
        WebhookVerifier([secret]).verify(headers, body)


@pytest.mark.parametrize("header, value", [
    ("webhook-timestamp", "9" * 5000), ("webhook-timestamp", "9" * 400), ("webhook-timestamp", "0"),
    ("webhook-timestamp", "\u0661\u0668\u0660\u0660"),
    ("webhook-signature", "v1"), ("webhook-signature", "v1,a,b"), ("webhook-signature", "v1,abc"),
    ("webhook-signature", "v1,\u00e9\u00e9\u00e9\u00e9"), ("webhook-signature", " "),
    ("webhook-id", "\u00e9\ud800"),  # a lone surrogate cannot even be encoded
])
def test_unparseable_header_is_a_signature_error(secret, header, value):
    body = event_body()
    headers = {**signed(secret, body, "msg_u"), header: value}
    with pytest.raises(SignatureError):
        WebhookVerifier([secret]).verify(headers, body)


def test_a_body_that_is_not_utf8_is_a_signature_error(secret):
    body = b'{"type": "\xe9"}'
    with pytest.raises(SignatureError, match="UTF-8"):
        WebhookVerifier([secret]).verify(signed_bytes(secret, body), body)


def test_unpadded_secret():
    unpadded = "whsec_" + base64.b64encode(b"k" * 32).decode().rstrip("=")
    body = event_body()
    WebhookVerifier([unpadded]).verify(signed(unpadded, body, "msg_i"), body)


def test_needs_a_secret():
    with pytest.raises(ValueError):
        WebhookVerifier([])
