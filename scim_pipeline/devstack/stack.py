"""The embedded stack of an installation: Scalekit emulator, webhook receiver, demo application, and Dagster (the
code server, the daemon, and for ``dev`` the webserver too), each in a process of its own, started in dependency
order and stopped in reverse.

Used by ``demo`` and ``dev`` and by the end-to-end tests, so they run exactly what a user runs.
"""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx

from scim_pipeline import config
from scim_pipeline.defs.instance import dagster_instance, ensure_dagster_home
from scim_pipeline.devstack import services

LOCATION_NAME = "scim_pipeline"  # the code location's name in the UI, as workspace.yaml names it


class Stack:
    def __init__(self, home: Path):
        self.home = Path(home)
        self.services: list[services.Service] = []
        self.emulator: services.Service | None = None
        self.receiver: services.Service | None = None
        self.app: services.Service | None = None
        self.scim2 = None  # a Scim2App, when the application is a SCIM 2.0 server
        self.dagster: subprocess.Popen | None = None  # the Dagster daemon
        self.webserver: subprocess.Popen | None = None
        self.code_server: subprocess.Popen | None = None
        self.workspace: Path | None = None  # the workspace file naming the code server, once it runs
        self.emulator_env: dict[str, str] = {}
        self._http: httpx.Client | None = None

    # --- services ---------------------------------------------------------------------------------------------------

    def start_emulator(self, *args: str) -> services.Service:
        """The emulator; a receiver started after it gets its webhooks (``start_receiver``)."""
        env_file = self.home / config.EMULATOR_ENV_FILE
        env_file.unlink(missing_ok=True)  # readiness is this file naming the new port

        def ready(service: services.Service) -> bool:
            values = config.read_dotenv(env_file)
            return values.get("SCALEKIT_ENVIRONMENT_URL", "").endswith(f":{service.port}")

        self.emulator = self._track(services.start("emulator", list(args), self.home, ready=ready))
        self.emulator_env = config.read_dotenv(env_file)
        # Children (receiver, Dagster) and this process talk to the emulator with its settings and its CA.
        os.environ.update(self.emulator_env)
        return self.emulator

    def start_receiver(self, port: int | None = None) -> services.Service:
        """The receiver (it verifies with the emulator's secret, so it starts after the emulator), and the emulator's
        webhooks pointed at it. Its port is picked only now: one picked before the emulator started could be taken
        by the emulator's own listeners meanwhile."""
        self.receiver = self._track(services.start(
            "webhooks", [], self.home, port=port, ready=lambda s: _http_ok(f"{s.url}/healthz")))
        if self.emulator is not None:
            self._emulator_http().post("/_emulator/webhook",
                                       json={"url": f"{self.receiver.url}/webhooks/scalekit"}).raise_for_status()
        return self.receiver

    def start_app(self, *args: str, port: int | None = None) -> services.Service:
        app_env = self.home / config.APP_ENV_FILE
        app_env.unlink(missing_ok=True)
        self.app = self._track(services.start(
            "app", list(args), self.home, port=port,
            ready=lambda s: app_env.exists() and _http_ok(f"{s.url}/healthz")))
        os.environ.update(config.read_dotenv(app_env))
        return self.app

    def start_scim2_app(self, port: int | None = None) -> services.Service:
        """``scim2-server`` as the application (a tenant per organization, a bearer token), and the pipeline's
        settings pointing at it, for this process and the ones it starts."""
        from scim_pipeline.devstack.scim2_app import start_scim2_server

        self.scim2 = start_scim2_server(self.home, port=port)
        self.app = self._track(self.scim2.service)
        os.environ.update(self.scim2.env())
        return self.app

    def _track(self, service: services.Service) -> services.Service:
        self.services.append(service)
        return service

    # --- Dagster ------------------------------------------------------------------------------------------------------

    def _dagster_env(self) -> dict[str, str]:
        return {**os.environ, "SCIM_PIPELINE_HOME": str(self.home), "DAGSTER_HOME": str(ensure_dagster_home()),
                "PYTHONUNBUFFERED": "1"}

    def start_code_server(self, timeout: float = 90.0) -> Path:
        """``scim-pipeline code-server`` (the code location over gRPC, its runs forked from a process that imported
        it once) on a free port, and a workspace file naming it (returned) for the webserver and the daemon: one
        code server for both, as in a deployment. Returns once it answers."""
        from dagster._grpc.client import DagsterGrpcClient

        port = services.free_port()
        log = self._log("dagster-code-server")
        self.code_server = subprocess.Popen(
            [_bin("scim-pipeline"), "code-server", "-h", "127.0.0.1", "-p", str(port), "--location-name",
             LOCATION_NAME],
            env=self._dagster_env(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        client = DagsterGrpcClient(port=port, host="127.0.0.1")
        deadline = time.monotonic() + timeout
        while True:
            if self.code_server.poll() is not None:
                raise RuntimeError(f"the Dagster code server exited with code {self.code_server.returncode}; "
                                   f"see {self.home / 'logs' / 'dagster-code-server.log'}")
            try:
                client.ping("ready")
                break
            except Exception:  # not listening yet, or still loading the code location
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the Dagster code server did not answer within {timeout:.0f}s") from None
                time.sleep(0.3)
        self.workspace = self.home / "dagster-workspace.yaml"
        self.workspace.write_text(f"load_from:\n  - grpc_server:\n      host: 127.0.0.1\n      port: {port}\n"
                                  f"      location_name: {LOCATION_NAME}\n")
        return self.workspace

    def _log(self, name: str):
        (self.home / "logs").mkdir(parents=True, exist_ok=True)
        return open(self.home / "logs" / f"{name}.log", "ab")

    def _dagster_target(self) -> list[str]:
        if self.workspace is None:
            self.start_code_server()
        return ["-w", str(self.workspace)]

    def start_daemon(self, timeout: float = 90.0) -> None:
        """``scim-pipeline daemon run`` (Dagster's daemon, sensors evaluated every half second) on the code server
        (started first if it is not running); returns once its sensor loop has a heartbeat."""
        # The instance's storage is created here, before any Dagster process starts: a webserver and a daemon that
        # both found it missing would create its SQLite databases at once, and one of them fails.
        instance = dagster_instance()
        target = self._dagster_target()
        log = self._log("dagster-daemon")
        self.dagster = subprocess.Popen(
            [_bin("scim-pipeline"), "daemon", "run", *target],
            env=self._dagster_env(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.dagster.poll() is not None:
                raise RuntimeError(f"the Dagster daemon exited with code {self.dagster.returncode}; "
                                   f"see {self.home / 'logs' / 'dagster-daemon.log'}")
            beats = instance.get_daemon_heartbeats()
            if "SENSOR" in beats:
                return
            time.sleep(0.5)
        raise RuntimeError(f"the Dagster daemon did not start within {timeout:.0f}s")

    def start_dagster(self, port: int = 3000) -> None:
        """What ``dagster dev`` runs, the webserver and the daemon, with the project's workspace and instance
        settings; the daemon is ``scim-pipeline daemon``, whose sensor loop ``dagster dev`` has no way to set."""
        dagster_instance()  # its storage first, as in start_daemon
        target = self._dagster_target()
        self.webserver = subprocess.Popen(
            [_bin("dagster-webserver"), *target, "-h", "127.0.0.1", "-p", str(port)],
            env=self._dagster_env(), stdin=subprocess.DEVNULL, start_new_session=True,
        )
        self.start_daemon()

    def dagster_running(self) -> bool:
        return all(p.poll() is None for p in (self.dagster, self.webserver, self.code_server) if p is not None)

    # --- lifecycle ------------------------------------------------------------------------------------------------------

    def stop(self) -> None:
        if self._http is not None:
            self._http.close()
        # The code server last: its group holds the runs in progress.
        for process in (self.dagster, self.webserver, self.code_server):
            if process is not None and process.poll() is None:
                _stop_group(process)
        for service in reversed(self.services):
            service.stop()

    def __enter__(self) -> "Stack":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- talking to the embedded services ---------------------------------------------------------------------------

    def truth(self) -> dict:
        """The emulator's truth (GET /_emulator/state)."""
        return self._emulator_http().get("/_emulator/state").json()

    def mutate(self, ops: list[dict]) -> dict:
        response = self._emulator_http().post("/_emulator/mutations", json=ops)
        if response.status_code == 400:
            raise ValueError(f"the emulator refused the mutations: {response.text[:500]}")
        response.raise_for_status()
        return response.json()

    def faults(self, **settings) -> None:
        self._emulator_http().post("/_emulator/faults", json=settings).raise_for_status()

    def app_state(self, organization_id: str | None = None) -> dict:
        """What the application holds, in the demo application's ``GET /state`` shape (a SCIM application is read
        back over SCIM)."""
        if self.scim2 is not None:
            orgs = [organization_id] if organization_id else [o["id"] for o in self.truth()["organizations"]]
            return self.scim2.state(orgs)
        params = {"organization_id": organization_id} if organization_id else None
        return httpx.get(f"{self.app.url}/state", params=params, timeout=30).json()

    def app_stats(self) -> dict:
        return httpx.get(f"{self.app.url}/stats", timeout=30).json()

    def _emulator_http(self) -> httpx.Client:
        if self._http is None:
            ctx = ssl.create_default_context(cafile=self.emulator_env["REQUESTS_CA_BUNDLE"])
            self._http = httpx.Client(base_url=self.emulator_env["SCALEKIT_ENVIRONMENT_URL"], verify=ctx, timeout=30)
        return self._http


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the process and its group (its code server and run workers too), SIGKILL after 30 s."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _bin(name: str) -> str:
    """A console script of this environment (beside the running interpreter)."""
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


def _http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
