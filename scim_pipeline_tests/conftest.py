import itertools

import pytest

from scim_pipeline.devstack import postgres as pg


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh SCIM_PIPELINE_HOME, with no configuration leaking in from the developer's shell."""
    for var in (
        "SCALEKIT_ENVIRONMENT_URL", "SCALEKIT_CLIENT_ID", "SCALEKIT_CLIENT_SECRET", "SCALEKIT_WEBHOOK_SECRET",
        "SCIM_PIPELINE_APP_URL", "SCIM_PIPELINE_APP_SECRET", "SCIM_PIPELINE_ROLE_MAPPINGS",
        "SCIM_PIPELINE_EVENTS_RETRY_S", "SCIM_PIPELINE_APP_PROTOCOL", "SCIM_PIPELINE_APP_TOKEN",
        "SCIM_PIPELINE_APP_TENANTS", "SCIM_PIPELINE_POSTGRES_URL",
    ):
        monkeypatch.delenv(var, raising=False)
    path = tmp_path / "home"
    path.mkdir()
    monkeypatch.setenv("SCIM_PIPELINE_HOME", str(path))
    return path


@pytest.fixture(scope="session")
def postgres_server():
    """One real PostgreSQL server for the whole session (initdb in a temporary folder, a free port), from the
    machine's PostgreSQL packages; the tests that need it are skipped, saying so, only where none is installed."""
    if pg.bin_dir() is None:
        pytest.skip("no PostgreSQL server installed (initdb not found on PATH, by pg_config, nor under "
                    "/usr/lib/postgresql/*/bin); .ci/run installs one")
    with pg.PostgresServer() as server:
        yield server


_databases = itertools.count(1)


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """The URL of a new, empty database on the session's server: each test starts from nothing."""
    return postgres_server.create_database(f"test_{next(_databases)}")
