"""Run the Scalekit emulator in tests, as a real subprocess reached over TLS by the real SDK.

    from scim_pipeline_tests.emulator_support import RunningEmulator, emulator_fixture

    emulator = emulator_fixture(orgs=2, users_per_org=40)      # a pytest fixture, in the test's `home`

    def test_something(emulator):
        client = emulator.client()                             # scalekit.ScalekitClient
        truth = emulator.state()                               # GET /_emulator/state
        results = emulator.mutate([{"op": "deactivate_user", "user_id": "diruser_..."}])
        emulator.faults(rate_limit_every=2)                    # POST /_emulator/faults
        emulator.set_webhook_url("http://127.0.0.1:9999/hook")

``RunningEmulator(home, ...)`` starts one directly (stop it with ``.stop()`` or use it as a context manager).

The SDK's gRPC channel reads its CA from ``GRPC_DEFAULT_SSL_ROOTS_FILE_PATH`` once per process (grpc caches the
default roots), so every emulator started here serves the same certificate: its TLS material is copied into each
home from one set made per test process (``seed_tls(home)`` does the same for an emulator started another way).
``.client()`` points the two CA variables of ``os.environ`` at it.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import tempfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from scim_pipeline import config
from scim_pipeline.devstack import services
from scim_pipeline.devstack.emulator import tls
from scim_pipeline.lib.private_files import write_private

_shared_tls: tls.TlsFiles | None = None


class MutationRejected(Exception):
    """The emulator answered 400 to a mutation batch; the message names the offending mutation."""


def _shared_tls_material() -> tls.TlsFiles:
    global _shared_tls
    if _shared_tls is None:
        _shared_tls = tls.ensure_tls_material(Path(tempfile.mkdtemp(prefix="scim-emulator-tls-")))
    return _shared_tls


def seed_tls(home: Path) -> None:
    """Put this test process's shared emulator certificate into ``home`` (for emulators started by other means,
    e.g. the demo stack): gRPC reads its CA roots once per process, so every emulator a process talks to must
    serve the same certificate."""
    shared = _shared_tls_material()
    folder = home / "tls"
    folder.mkdir(parents=True, exist_ok=True)
    for src in (shared.ca_cert, shared.server_cert):
        dst = folder / src.name
        if not dst.exists():
            shutil.copyfile(src, dst)
    key = folder / shared.server_key.name
    if not key.exists():  # a private key: created private, not copied and then chmod-ed
        write_private(key, shared.server_key.read_bytes())


def _tls_ready(port: int, ca_file: str) -> bool:
    ctx = ssl.create_default_context(cafile=ca_file)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            with ctx.wrap_socket(sock, server_hostname="localhost"):
                return True
    except (OSError, ssl.SSLError):
        return False


_seed_tls = seed_tls  # the name it had first; kept for callers that use it


class RunningEmulator:
    """A ``scim-pipeline emulator`` subprocess with its ``emulator.env`` read, and helpers for its control API."""

    def __init__(self, home: Path, *, seed: int = 7, orgs: int = 2, users_per_org: int = 40, groups_per_org: int = 6,
                 webhook_url: str | None = None, retry_time_scale: float = 1.0, token_ttl: int = 3600,
                 churn: float = 0.0, extra_args: list[str] | None = None, timeout: float = 60.0):
        self.home = Path(home)
        seed_tls(self.home)
        args = ["--seed", str(seed), "--orgs", str(orgs), "--users-per-org", str(users_per_org),
                "--groups-per-org", str(groups_per_org), "--retry-time-scale", str(retry_time_scale),
                "--token-ttl", str(token_ttl), "--churn", str(churn)]
        if webhook_url:
            args += ["--webhook-url", webhook_url]
        args += extra_args or []
        self.service = services.start("emulator", args, self.home, ready=self._ready, timeout=timeout)
        self.port = self.service.port
        self.env: dict[str, str] = config.read_dotenv(self.home / config.EMULATOR_ENV_FILE)
        self.url = self.env["SCALEKIT_ENVIRONMENT_URL"]
        self._http = httpx.Client(base_url=self.url, verify=ssl.create_default_context(
            cafile=self.env["REQUESTS_CA_BUNDLE"]), timeout=30)

    def _ready(self, service: services.Service) -> bool:
        env = config.read_dotenv(self.home / config.EMULATOR_ENV_FILE)
        if not env.get("SCALEKIT_ENVIRONMENT_URL", "").endswith(f":{service.port}"):
            return False
        return _tls_ready(service.port, env["REQUESTS_CA_BUNDLE"])

    # --- the environment and the SDK ----------------------------------------------------------------------------------

    def apply_env(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Set every variable of ``emulator.env`` in ``os.environ`` for the test (undone after it)."""
        for key, value in self.env.items():
            monkeypatch.setenv(key, value)

    def client(self, client_secret: str | None = None, **kwargs: Any):
        """A real ``scalekit.ScalekitClient`` for this emulator (``client_secret`` overrides the right one)."""
        from scalekit import ScalekitClient

        for var in config.CA_VARS:
            os.environ[var] = self.env[var]
        return ScalekitClient(self.url, self.env["SCALEKIT_CLIENT_ID"],
                              client_secret if client_secret is not None else self.env["SCALEKIT_CLIENT_SECRET"],
                              **kwargs)

    # --- control API ------------------------------------------------------------------------------------------

    def control(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """A raw control-API request, e.g. ``control("GET", "/_emulator/healthz")``."""
        return self._http.request(method, path, **kwargs)

    def state(self, org: str | None = None) -> dict:
        """The directory's truth (``GET /_emulator/state``), for every organization or one."""
        response = self.control("GET", "/_emulator/state", params={"organization_id": org} if org else None)
        response.raise_for_status()
        return response.json()

    def mutate(self, ops: list[dict]) -> list[dict]:
        """Apply mutations all-or-nothing; returns ``results`` (``op``, ``id``, ``event_ids``) or raises
        ``MutationRejected``."""
        response = self.control("POST", "/_emulator/mutations", json=ops)
        if response.status_code == 400:
            raise MutationRejected(response.json().get("error_description", response.text))
        response.raise_for_status()
        return response.json()["results"]

    def faults(self, **settings: Any) -> dict:
        """Set faults (any subset of the fault keys in docs/emulator.md, 0/False = off); returns all current settings."""
        response = self.control("POST", "/_emulator/faults", json=settings)
        response.raise_for_status()
        return response.json()

    def set_webhook_url(self, url: str | None) -> None:
        self.control("POST", "/_emulator/webhook", json={"url": url}).raise_for_status()

    def webhook_status(self) -> dict:
        """Delivery counters and recent attempts (``GET /_emulator/webhook``)."""
        response = self.control("GET", "/_emulator/webhook")
        response.raise_for_status()
        return response.json()

    def events(self) -> list[dict]:
        """Recent events emitted, oldest first, whether or not they were delivered."""
        response = self.control("GET", "/_emulator/events")
        response.raise_for_status()
        return response.json()["events"]

    # --- lifecycle --------------------------------------------------------------------------------------------

    def stop(self) -> int | None:
        """SIGTERM and wait; returns the exit code."""
        self._http.close()
        self.service.stop()
        return self.service.process.returncode

    def __enter__(self) -> "RunningEmulator":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def emulator_fixture(scope: str = "function", **options: Any):
    """A pytest fixture yielding a ``RunningEmulator`` started with ``options`` (see ``RunningEmulator``).

    Function scope: in the test's ``home`` with ``emulator.env`` applied to the environment for the test.
    Module/session scope: in a home of its own; use ``.client()``/``.env`` (the environment is not changed).
    """
    if scope == "function":
        @pytest.fixture
        def _emulator(home, monkeypatch):
            emulator = RunningEmulator(home, **options)
            emulator.apply_env(monkeypatch)
            try:
                yield emulator
            finally:
                emulator.stop()
    else:
        @pytest.fixture(scope=scope)
        def _emulator(tmp_path_factory):
            emulator = RunningEmulator(tmp_path_factory.mktemp("emulator-home"), **options)
            try:
                yield emulator
            finally:
                emulator.stop()
    return _emulator
