"""The demo application: an HTTP service standing in for a customer's SaaS application, implementing the delivery
protocol (docs/delivery-protocol.md).

It receives signed change batches on ``POST /scim/changes``, applies them to its SQLite store and answers per change;
``GET /state`` shows what it holds and ``GET /stats`` how often each change was applied (tests prove with it that
nothing is applied twice). ``--fail-rate`` and ``--rate-limit-rate`` make it misbehave on purpose, including the
nasty case of a batch applied and committed whose answer is lost.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import random
import secrets
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from scim_pipeline.config import APP_ENV_FILE, ConfigError, Settings, settings, write_dotenv
from scim_pipeline.devstack.demo_app.store import IdempotencyConflict, Store, parse_batch
from scim_pipeline.lib.asgi import bind, serve

STORE_FILE = "app.sqlite"
SECRET_VAR = "SCIM_PIPELINE_APP_SECRET"
URL_VAR = "SCIM_PIPELINE_APP_URL"
SEED_VAR = "SCIM_PIPELINE_APP_SEED"
MAX_BODY_BYTES = 16 * 1024 * 1024  # a 500-change batch is well under 1 MiB; this only stops abuse

log = logging.getLogger("scim_pipeline.devstack.demo_app")


@dataclass
class Faults:
    """Injected failures, drawn from a seeded RNG so that a run can be repeated."""

    fail_rate: float = 0.0
    rate_limit_rate: float = 0.0
    seed: int | None = None
    counts: dict[str, int] = field(default_factory=lambda: {"rate_limited": 0, "failed_before": 0, "failed_after": 0})

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()

    def draw(self) -> str | None:
        """None, or one of the keys of ``counts``: what this request suffers."""
        with self._lock:
            r = self._rng.random()
            if r < self.rate_limit_rate:
                fault = "rate_limited"
            elif r < self.rate_limit_rate + self.fail_rate:
                # Half before applying, half after committing: the second is the answer lost in transit.
                fault = "failed_before" if self._rng.random() < 0.5 else "failed_after"
            else:
                return None
            self.counts[fault] += 1
            return fault


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def create_app(store: Store, secret: str, faults: Faults | None = None) -> Starlette:
    """The ASGI application over ``store``, verifying batches signed with ``secret``."""
    faults = faults or Faults()
    webhook = Webhook(secret)
    counters = {"requests": 0, "replays": 0}

    async def post_changes(request: Request) -> JSONResponse:
        counters["requests"] += 1
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            return _error(413, f"body over {MAX_BODY_BYTES} bytes")
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            return _error(413, f"body over {MAX_BODY_BYTES} bytes")
        try:
            webhook.verify(body, dict(request.headers), json_parse=False)
        except (WebhookVerificationError, ValueError, TypeError) as exc:
            # ValueError covers a body that is not UTF-8 and signature headers that are not base64.
            return _error(401, f"signature verification failed: {exc}")
        try:
            batch = parse_batch(json.loads(body))
        except ValueError as exc:  # json.JSONDecodeError is a ValueError too
            return _error(400, f"malformed batch: {exc}")
        key = request.headers.get("idempotency-key") or batch.batch_id

        fault = faults.draw()
        if fault == "rate_limited":
            return _error(429, "rate limited (injected)", {"Retry-After": "1"})
        if fault == "failed_before":
            return _error(500, "internal error before applying (injected)")
        try:
            response, replayed = store.apply(key, batch)
        except IdempotencyConflict as exc:
            return _error(422, str(exc))
        counters["replays"] += replayed
        if fault == "failed_after":
            return _error(500, "internal error after applying (injected)")
        return JSONResponse(response, headers={"Idempotent-Replayed": "true"} if replayed else None)

    async def get_state(request: Request) -> JSONResponse:
        return JSONResponse(store.state(request.query_params.get("organization_id") or None))

    async def get_stats(request: Request) -> JSONResponse:
        return JSONResponse({**counters, **store.stats(), "faults": dict(faults.counts)})

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[
            Route("/scim/changes", post_changes, methods=["POST"]),
            Route("/state", get_state, methods=["GET"]),
            Route("/stats", get_stats, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
        ]
    )


def generate_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def _secret(cfg: Settings) -> tuple[str, bool]:
    """The signing secret and whether this application owns it (and so writes it to app.env)."""
    if os.environ.get(SECRET_VAR):
        return cfg.app_secret(), False  # given by the operator; ConfigError if malformed
    try:
        # Keep the secret of an earlier run in this home, so that a restart does not invalidate signed retries.
        return cfg.app_secret(), True
    except ConfigError:
        return generate_secret(), True


def _seed() -> int | None:
    raw = os.environ.get(SEED_VAR)
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{SEED_VAR} is malformed: expected an integer, got {raw!r}") from None


def _url(host: str, port: int) -> str:
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run_from_cli(args: argparse.Namespace) -> int:
    for flag, rate in (("--fail-rate", args.fail_rate), ("--rate-limit-rate", args.rate_limit_rate)):
        if not 0.0 <= rate <= 1.0:
            print(f"scim-pipeline app: {flag} must be between 0 and 1, got {rate}", file=sys.stderr)
            return 2
    if args.fail_rate + args.rate_limit_rate > 1.0:
        print("scim-pipeline app: --fail-rate plus --rate-limit-rate must not exceed 1", file=sys.stderr)
        return 2
    cfg = settings()
    secret, owned = _secret(cfg)
    faults = Faults(args.fail_rate, args.rate_limit_rate, _seed())

    try:
        sock = bind(args.host, args.port)  # before app.env is written: ``--port 0`` gives a known port
    except OSError as exc:
        print(f"scim-pipeline app: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    port = sock.getsockname()[1]
    url = _url(args.host, port)
    env_file: Path = cfg.home / APP_ENV_FILE
    write_dotenv(env_file, {SECRET_VAR: secret, URL_VAR: url} if owned else {URL_VAR: url})

    store = Store(cfg.home / STORE_FILE)
    print(
        f"scim-pipeline app: listening on {url} (fail-rate {args.fail_rate}, rate-limit-rate {args.rate_limit_rate});"
        f" {'secret and URL' if owned else 'URL'} in {env_file}",
        flush=True,
    )
    try:
        # No lifespan (the store is opened and closed here); each request logged, to watch the pipeline deliver.
        served = serve(create_app(store, secret, faults), sock, lifespan=False, access_log=True)
    finally:
        store.close()
        sock.close()
    print("scim-pipeline app: stopped", flush=True)
    return 0 if served else 1
