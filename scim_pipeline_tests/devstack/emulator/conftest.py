import pytest

from scim_pipeline_tests.emulator_support import emulator_fixture

# One read-only emulator shared by the module tests that only list; tests that mutate or inject faults start
# their own (function scope), so no test sees another's changes.
shared_emulator = emulator_fixture(scope="module", seed=11, orgs=3, users_per_org=75, groups_per_org=6)
emulator = emulator_fixture(seed=5, orgs=2, users_per_org=20, groups_per_org=4)


@pytest.fixture
def client(emulator):
    return emulator.client()


@pytest.fixture
def receiver():
    from scim_pipeline_tests.devstack.emulator.receiver import WebhookReceiver

    r = WebhookReceiver()
    yield r
    r.close()
