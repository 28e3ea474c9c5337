"""``scim-pipeline emulator``: wires the synthetic directory, the gRPC services, the token/control API, the webhook
sender and the churn behind one TLS port, writes ``emulator.env`` once it is ready, and stops cleanly on
SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import json
import logging
import signal
import sys
import time
from collections import deque
from pathlib import Path

import uvicorn
from uvicorn.server import ServerState

from scim_pipeline import config
from scim_pipeline.devstack.emulator import tls
from scim_pipeline.devstack.emulator.control import build_app
from scim_pipeline.devstack.emulator.gateway import Credentials, FaultInjector, Tokens
from scim_pipeline.devstack.emulator.grpc_services import Edge, build_server, user_entry
from scim_pipeline.devstack.emulator.mutations import Applied, Mutator
from scim_pipeline.devstack.emulator.router import AlpnRouter, event_loop_runner
from scim_pipeline.devstack.emulator.synthetic import UserFactory, generate, new_factory
from scim_pipeline.devstack.emulator.webhooks import WebhookSender, new_webhook_secret
from scim_pipeline.lib.private_files import write_private

log = logging.getLogger("scim_pipeline.devstack.emulator")

SECRETS_FILE = "emulator-secrets.json"


def _occurred_us(event: dict) -> int:
    return int(dt.datetime.fromisoformat(event["occurred_at"].replace("Z", "+00:00")).timestamp() * 1_000_000)


def load_webhook_secret(home: Path) -> str:
    """The home's webhook signing secret, created once: receivers configured with it keep verifying after restarts."""
    path = home / SECRETS_FILE
    try:
        secret = json.loads(path.read_text())["webhook_secret"]
        if isinstance(secret, str) and secret.startswith("whsec_"):
            return secret
    except (OSError, ValueError, KeyError, TypeError):
        pass
    secret = new_webhook_secret()
    write_private(path, json.dumps({"webhook_secret": secret}).encode())
    return secret


class Emulator:
    """The running emulator's parts. Other code in this package reaches them through this object."""

    def __init__(self, home: Path, seed: int = 7, orgs: int = 5, users_per_org: int = 200, groups_per_org: int = 12,
                 webhook_url: str | None = None, retry_time_scale: float = 1.0, token_ttl: int = 3600):
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        self.seed = seed
        self.port = 0
        self.grpc_port = 0  # the internal gRPC port (loopback), for diagnostics and benchmarks
        self.router_pid: int | None = None  # the router process (see router.py), for diagnostics
        self.started = time.monotonic()
        self.store, self.factories = generate(seed, orgs, users_per_org, groups_per_org)
        # The directory is a large, long-lived object graph: keep the cyclic GC from walking it on every full pass
        # (a full pass over 100,000 users stalls every call in flight).
        gc.collect()
        gc.freeze()
        self.credentials = Credentials.for_seed(seed)
        self.tokens = Tokens(token_ttl)
        self.faults = FaultInjector(self.tokens)
        self.webhook_secret = load_webhook_secret(home)
        self.sender = WebhookSender(self.webhook_secret, webhook_url, self.faults, retry_time_scale, seed)
        self.mutator = Mutator(self.store, new_user=self._hire)
        self.event_log: deque[tuple[int, dict]] = deque(maxlen=10_000)

    def factory(self, organization_id: str) -> UserFactory:
        """The organization's user factory; one created after start-up gets its own on first use."""
        factory = self.factories.get(organization_id)
        if factory is None:
            factory = self.factories[organization_id] = new_factory(
                self.seed, self.store.organizations[organization_id], self.factories)
        return factory

    def _hire(self, user, at: int) -> None:
        factory = self.factory(user.organization_id)
        factory.providers.setdefault(user.directory_id, self.store.directories[user.directory_id].provider)
        factory.fill(user, at)

    def mutate(self, ops) -> list[Applied]:
        """Apply a batch all-or-nothing (raises MutationError), then log and send its events in order."""
        with self.store.lock:  # keeps event order equal to commit order across concurrent callers
            applied = self.mutator.apply(ops)
            events = [e for a in applied for e in a.events]
            self.event_log.extend((_occurred_us(e), e) for e in events)
            self.sender.publish(events)
        return applied

    def recent_events(self) -> list[tuple[int, dict]]:
        with self.store.lock:
            return list(self.event_log)

    def recent_events_json(self) -> list[dict]:
        return [e for _, e in self.recent_events()]

    def prebuild(self, detail: bool = True) -> int:
        """Serialize every user's listing entry now (the emulator's own ceiling in the benchmark)."""
        with self.store.lock:
            users = list(self.store.users.values())
        for u in users:
            with self.store.lock:
                user_entry(self.store, u, detail)
        return len(users)

    def env(self) -> dict[str, str]:
        ca = str(tls.ensure_tls_material(self.home).ca_cert)
        return {
            "SCALEKIT_ENVIRONMENT_URL": f"https://localhost:{self.port}",
            "SCALEKIT_CLIENT_ID": self.credentials.client_id,
            "SCALEKIT_CLIENT_SECRET": self.credentials.client_secret,
            "SCALEKIT_WEBHOOK_SECRET": self.webhook_secret,
            "REQUESTS_CA_BUNDLE": ca,
            "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH": ca,
        }

    async def serve(self, host: str, port: int, churn_per_min: float = 0.0) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

        env_path = self.home / config.EMULATOR_ENV_FILE
        env_path.unlink(missing_ok=True)  # never let a stale file announce a server that is not up yet
        files = tls.ensure_tls_material(self.home)

        uv_config = uvicorn.Config(build_app(self), lifespan="off", access_log=False, log_level="warning",
                                   proxy_headers=False, server_header=False)
        uv_config.load()
        http_state = ServerState()
        http_class = uv_config.http_protocol_class

        grpc_server, grpc_port = build_server(
            self.store, Edge(self.tokens, self.faults), "https://localhost", self.recent_events,
            mutate=self.mutate,
            tls_key_and_cert=(files.server_key.read_bytes(), files.server_cert.read_bytes()))
        self.grpc_port = grpc_port
        router = AlpnRouter(tls.server_context(files), grpc_port,
                            lambda: http_class(config=uv_config, server_state=http_state, app_state={}))
        try:
            self.port = router.bind(host, port)
        except OSError as exc:
            grpc_server.stop(0)
            reason = "address already in use" if getattr(exc, "errno", None) in (48, 98) else exc.strerror or str(exc)
            print(f"scim-pipeline emulator: cannot listen on {host}:{port}: {reason}", file=sys.stderr)
            return 1

        grpc_server.start()
        router_failed = False

        def router_exited() -> None:
            nonlocal router_failed
            router_failed = True
            stop.set()

        self.router_pid = router.serve(on_router_exit=router_exited)
        self.sender.start()
        config.write_dotenv(env_path, self.env())
        self.started = time.monotonic()
        log.warning("emulator ready on https://localhost:%d: %d organizations, %d users, %d groups",
                    self.port, len(self.store.organizations), len(self.store.users), len(self.store.groups))

        churn_task = None
        if churn_per_min > 0:
            from scim_pipeline.devstack.emulator.churn import Churn
            churn_task = loop.create_task(Churn(self, churn_per_min, self.seed).run(stop))

        await stop.wait()

        log.warning("emulator stopping")
        if churn_task is not None:
            churn_task.cancel()
            try:
                await churn_task
            except (asyncio.CancelledError, Exception):
                pass
        await router.close()
        for conn in list(http_state.connections):
            conn.shutdown()
        grpc_server.stop(0.2).wait(3)
        await asyncio.to_thread(self.sender.stop)
        return 1 if router_failed else 0


def run_from_cli(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for name, value in (("--orgs", args.orgs), ("--users-per-org", args.users_per_org),
                        ("--groups-per-org", args.groups_per_org), ("--token-ttl", args.token_ttl)):
        if value < 0:
            print(f"scim-pipeline emulator: {name} must not be negative", file=sys.stderr)
            return 2
    if not 0 <= args.port <= 65535:
        print("scim-pipeline emulator: --port must be between 0 and 65535", file=sys.stderr)
        return 2
    emulator = Emulator(
        config.home(), seed=args.seed, orgs=args.orgs, users_per_org=args.users_per_org,
        groups_per_org=args.groups_per_org, webhook_url=args.webhook_url, retry_time_scale=args.retry_time_scale,
        token_ttl=args.token_ttl)
    return event_loop_runner()(emulator.serve(args.host, args.port, args.churn))

