"""The whole pipeline against real parts: the emulator (real SDK over TLS), the demo application over HTTP, DuckDB
files in the test's home and Dagster runs executed in this process on the home's own instance."""

import httpx
import pytest

from scim_pipeline.config import settings
from scim_pipeline.devstack import services
from scim_pipeline.devstack.convergence import differences
from scim_pipeline.provisioning.role_mapping import load_role_mapping
from scim_pipeline_tests.emulator_support import RunningEmulator


class World:
    def __init__(self, home, emulator: RunningEmulator, app: services.Service):
        self.home = home
        self.emulator = emulator
        self.app = app

    def app_state(self) -> dict:
        return httpx.get(f"{self.app.url}/state", timeout=10).json()

    def app_stats(self) -> dict:
        return httpx.get(f"{self.app.url}/stats", timeout=10).json()

    def differences(self) -> list[str]:
        return differences(self.app_state(), self.emulator.state(), load_role_mapping(settings().role_mappings_path()))

    def org_ids(self) -> list[str]:
        return sorted(o["id"] for o in self.emulator.state()["organizations"])


def start_app(home, *args) -> services.Service:
    return services.start("app", list(args), home, ready=lambda s: (home / "app.env").exists()
                          and services.port_open("127.0.0.1", s.port))


@pytest.fixture
def world(home, monkeypatch, request):
    """Emulator + demo application in a fresh home; options via ``@pytest.mark.world(orgs=..., app_args=[...])``."""
    marker = request.node.get_closest_marker("world")
    options = dict(marker.kwargs) if marker else {}
    app_args = options.pop("app_args", [])
    options = {"seed": 3, "orgs": 3, "users_per_org": 30, "groups_per_org": 5, **options}
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster"))
    emulator = RunningEmulator(home, **options)
    emulator.apply_env(monkeypatch)
    app = start_app(home, *app_args)
    try:
        yield World(home, emulator, app)
    finally:
        app.stop()
        emulator.stop()


def pytest_configure(config):
    config.addinivalue_line("markers", "world(**options): emulator options and app_args for the world fixture")
