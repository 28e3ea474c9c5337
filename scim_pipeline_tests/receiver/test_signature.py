import base64
from datetime import datetime, timezone

import pytest
from standardwebhooks import Webhook

from scim_pipeline.receiver.signature import SignatureError, Verifier, sign, signed_headers
from scim_pipeline_tests.receiver.helpers import event_body, new_secret, signed

NOW = 1_800_000_000


def test_accepts_reference_signature(secret):
    body = event_body()
    headers = signed(secret, body, "msg_a", NOW)
    assert Verifier([secret]).verify(headers, body, now=NOW) == "msg_a"


def test_reference_library_accepts_ours(secret):
    body = event_body()
    headers = signed_headers(secret, "msg_b", body)
    assert Webhook(secret).verify(body, headers) is not None


def test_signature_is_over_raw_bytes(secret):
    body = b'{"type": "x",   "id": "\\u00e9"}'  # spacing and escapes a re-serialization would change
    headers = signed(secret, body, "msg_c", NOW)
    Verifier([secret]).verify(headers, body, now=NOW)
    with pytest.raises(SignatureError):
        Verifier([secret]).verify(headers, b'{"type": "x", "id": "\\u00e9"}', now=NOW)


def test_any_configured_secret_any_v1_entry(secret):
    old, other = new_secret(), new_secret()
    body = event_body()
    headers = signed(old, body, "msg_d", NOW)
    # Several entries, other schemes and garbage among them, as a producer mid-rotation may send.
    wrong = base64.b64encode(b"x" * 32).decode()
    headers["webhook-signature"] = f"v1a,AAAA v1,{wrong} v1,%%% " + headers["webhook-signature"]
    assert Verifier([secret, old]).verify(headers, body, now=NOW) == "msg_d"
    with pytest.raises(SignatureError, match="mismatch"):
        Verifier([secret, other]).verify(headers, body, now=NOW)


@pytest.mark.parametrize("offset, ok", [(-300, True), (300, True), (-301, False), (301, False)])
def test_timestamp_tolerance(secret, offset, ok):
    body = event_body()
    headers = signed(secret, body, "msg_e", NOW + offset)
    if ok:
        Verifier([secret]).verify(headers, body, now=NOW)
    else:
        with pytest.raises(SignatureError, match="tolerance"):
            Verifier([secret]).verify(headers, body, now=NOW)


@pytest.mark.parametrize("header", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_missing_header(secret, header):
    body = event_body()
    headers = signed(secret, body, "msg_f", NOW)
    del headers[header]
    with pytest.raises(SignatureError, match="missing"):
        Verifier([secret]).verify(headers, body, now=NOW)


@pytest.mark.parametrize("value", ["1.8e9", "-5", "", " 1800000000", "１８００"])
def test_malformed_timestamp(secret, value):
    body = event_body()
    headers = signed(secret, body, "msg_g", NOW)
    headers["webhook-timestamp"] = value
    with pytest.raises(SignatureError):
        Verifier([secret]).verify(headers, body, now=NOW)


def test_sign_matches_reference(secret):
    body = event_body()
    ours = sign(secret, "msg_h", NOW, body)
    theirs = Webhook(secret).sign("msg_h", datetime.fromtimestamp(NOW, timezone.utc), body.decode())
    assert ours == theirs


def test_unpadded_secret():
    key = base64.b64encode(b"k" * 32).decode().rstrip("=")
    body = event_body()
    headers = signed_headers("whsec_" + key, "msg_i", body, NOW)
    Verifier(["whsec_" + key]).verify(headers, body, now=NOW)


def test_needs_a_secret():
    with pytest.raises(ValueError):
        Verifier([])
