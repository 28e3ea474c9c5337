import pytest

from scim_pipeline_tests.receiver.helpers import new_secret


@pytest.fixture
def secret() -> str:
    return new_secret()
