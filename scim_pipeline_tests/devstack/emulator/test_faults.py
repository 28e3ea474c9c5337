"""Injected faults surface through the real SDK as the SDK's own exceptions, and tokens refresh after expiry."""

import time

import pytest
from scalekit.common.exceptions import ScalekitServiceUnavailableException, ScalekitTooManyRequestsException

from scim_pipeline_tests.emulator_support import RunningEmulator, emulator_fixture

# Faults do not change the data: one emulator serves the module, with every fault switched off after each test.
emulator = emulator_fixture(scope="module", seed=5, orgs=2, users_per_org=20, groups_per_org=4)

ALL_OFF = dict(latency_ms=0, rate_limit_every=0, unavailable_every=0, malformed_page_every=0, webhook_drop_rate=0, webhook_duplicate_rate=0,
               webhook_reorder_window=0, webhook_delay_ms=0)


@pytest.fixture(autouse=True)
def _faults_off(emulator):
    yield
    emulator.faults(**ALL_OFF)


def test_expired_tokens_are_refreshed_by_the_sdk(emulator, client):
    before = client.core_client.access_token
    client.organization.list_organizations(page_size=5)
    emulator.faults(expire_tokens=True)
    response, _ = client.organization.list_organizations(page_size=5)  # UNAUTHENTICATED, re-auth, retry
    assert len(response.organizations) == 2
    assert client.core_client.access_token != before


def test_short_token_ttl_expires(home):
    with RunningEmulator(home, orgs=1, users_per_org=3, token_ttl=1) as emu:
        client = emu.client()
        first = client.core_client.access_token
        time.sleep(1.2)
        client.organization.list_organizations()
        assert client.core_client.access_token != first


def test_rate_limit_surfaces_at_once(emulator, client):
    emulator.faults(rate_limit_every=2)
    client.organization.list_organizations()  # call 1
    with pytest.raises(ScalekitTooManyRequestsException):
        client.organization.list_organizations()  # call 2
    client.organization.list_organizations()  # call 3
    emulator.faults(rate_limit_every=0)
    for _ in range(3):
        client.organization.list_organizations()


def test_unavailable_on_every_call_fails_after_the_sdk_retries(emulator, client):
    emulator.faults(unavailable_every=1)
    started = time.monotonic()
    with pytest.raises(ScalekitServiceUnavailableException):
        client.organization.list_organizations()
    assert time.monotonic() - started >= 1.0  # the SDK backed off and retried before giving up
    emulator.faults(unavailable_every=2)  # every other call: the SDK's retry gets through
    client.organization.list_organizations()
    emulator.faults(unavailable_every=0)


def test_latency(emulator, client):
    emulator.faults(latency_ms=300)
    started = time.monotonic()
    client.organization.list_organizations()
    assert time.monotonic() - started >= 0.3
    assert emulator.faults(latency_ms=0)["latency_ms"] == 0


def test_unknown_fault_is_refused(emulator):
    response = emulator.control("POST", "/_emulator/faults", json={"explode": True})
    assert response.status_code == 400 and "explode" in response.text
    response = emulator.control("POST", "/_emulator/faults", json={"webhook_drop_rate": 2})
    assert response.status_code == 400
