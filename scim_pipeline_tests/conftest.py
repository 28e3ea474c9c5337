import pytest


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh SCIM_PIPELINE_HOME, with no configuration leaking in from the developer's shell."""
    for var in (
        "SCALEKIT_ENVIRONMENT_URL", "SCALEKIT_CLIENT_ID", "SCALEKIT_CLIENT_SECRET", "SCALEKIT_WEBHOOK_SECRET",
        "SCIM_PIPELINE_APP_URL", "SCIM_PIPELINE_APP_SECRET", "SCIM_PIPELINE_ROLE_MAPPINGS",
        "SCIM_PIPELINE_EVENTS_RETRY_S", "SCIM_PIPELINE_APP_PROTOCOL", "SCIM_PIPELINE_APP_TOKEN",
        "SCIM_PIPELINE_APP_TENANTS",
    ):
        monkeypatch.delenv(var, raising=False)
    path = tmp_path / "home"
    path.mkdir()
    monkeypatch.setenv("SCIM_PIPELINE_HOME", str(path))
    return path
