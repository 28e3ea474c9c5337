"""The webhook receiver: an ASGI app that accepts Scalekit's signed directory events into the durable inbox.

``POST /webhooks/scalekit``: 413 for a body over the limit (declared or streamed), 400 for a body that is not UTF-8
(signatures are over text), 401 unless the Standard Webhooks signature and timestamp check out (``verify``), 400 for
a body that is not a JSON object, else 200 once the event is durable (``accepted``, or ``duplicate`` for a webhook-id
already stored). Event types are not judged here: the webhook sensor decides what to apply, so an unknown type is
stored like any other.

``GET /healthz``: 200 with the inbox's last seq; 503 while the inbox's database cannot be reached (a load balancer
then sends Scalekit's deliveries to another receiver).

The inbox is a SQLite file in the home, or the PostgreSQL database that every receiver shares when
``SCIM_PIPELINE_POSTGRES_URL`` is set; while that database is down every event is answered 503 (never 2xx for an
event not stored), and the receiver goes on as soon as it is back.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import sys
from contextlib import asynccontextmanager
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from scim_pipeline.lib.asgi import bind, serve
from scim_pipeline.receiver.inbox import Inbox
from scim_pipeline.receiver.verify import SignatureError, WebhookVerifier

log = logging.getLogger("scim_pipeline.receiver")

WEBHOOK_PATH = "/webhooks/scalekit"
MAX_BODY = 1024 * 1024


class _Rejected(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


async def _read_body(request: Request, limit: int) -> bytes:
    """The raw body, refused as soon as it is known to exceed ``limit``: never more than that is held."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise _Rejected(400, "malformed content-length")
        if int(declared) > limit:
            raise _Rejected(413, f"body over {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():  # also covers chunked bodies, which declare no length
        size += len(chunk)
        if size > limit:
            raise _Rejected(413, f"body over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _text(body: bytes) -> str:
    # Before the signature check, which the library makes over text: such a body could be neither signed nor JSON.
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise _Rejected(400, "body is not valid JSON") from None


def _parse(text: str) -> dict:
    try:
        payload = json.loads(text)
    except ValueError:
        raise _Rejected(400, "body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise _Rejected(400, "body is not a JSON object")
    return payload


def create_app(
    inbox_location: str | Path,
    secrets: list[str],
    max_body: int = MAX_BODY,
    store: bool = True,
) -> Starlette:
    """The receiver's ASGI app, storing into the inbox at ``inbox_location`` (a SQLite file's path or a PostgreSQL
    URL). ``store=False`` answers right after verification and parsing, without touching the
    inbox: a benchmark's ceiling, never for real use. The app's inbox is ``app.state.inbox``."""
    verifier = WebhookVerifier(secrets)
    inbox = Inbox(inbox_location)

    async def receive_webhook(request: Request) -> JSONResponse:
        try:
            body = await _read_body(request, max_body)
            text = _text(body)
            webhook_id = verifier.verify(request.headers, body)
            payload = _parse(text)
        except (_Rejected, SignatureError) as exc:
            status = exc.status if isinstance(exc, _Rejected) else 401
            _log_rejection(request, status, str(exc))
            return JSONResponse({"error": str(exc)}, status)
        if not store:
            return JSONResponse({"status": "accepted"})
        try:
            stored = await inbox.append(webhook_id, text, payload)
        except Exception as exc:  # not stored, so not acknowledged: Scalekit will retry
            _log_rejection(request, 503, f"inbox unavailable: {exc.__class__.__name__}")
            return JSONResponse({"error": "inbox unavailable"}, 503)
        return JSONResponse({"status": "duplicate" if stored.duplicate else "accepted", "seq": stored.seq})

    async def healthz(request: Request) -> JSONResponse:
        try:
            return JSONResponse({"status": "ok", "last_seq": await run_in_threadpool(inbox.last_seq)})
        except Exception as exc:
            log.warning("health check: inbox unavailable: %s", exc)
            return JSONResponse({"status": "inbox unavailable"}, 503)

    @asynccontextmanager
    async def lifespan(app: Starlette):
        if store:
            await run_in_threadpool(inbox.start)
        try:
            yield
        finally:
            # Uvicorn has finished the in-flight requests by now; this writes whatever is still queued.
            await run_in_threadpool(inbox.close)

    app = Starlette(
        routes=[Route(WEBHOOK_PATH, receive_webhook, methods=["POST"]), Route("/healthz", healthz, methods=["GET"])],
        lifespan=lifespan,
    )
    app.state.inbox = inbox
    return app


def _log_rejection(request: Request, status: int, reason: str) -> None:
    client = request.client.host if request.client else "-"
    webhook_id = (request.headers.get("webhook-id") or "-")[:80]
    log.warning("webhook rejected: status=%d reason=%r webhook-id=%s client=%s", status, reason, webhook_id, client)


# ------------------------------------------------------------------------------------------------------ server

# The inbox opens and closes with the app's lifespan; requests still in flight at shutdown get 10 s to finish.
SERVER_OPTIONS = {"lifespan": True, "access_log": False, "timeout_graceful_shutdown": 10}


def run_from_cli(args: argparse.Namespace) -> int:
    from scim_pipeline.config import settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = settings()
    secrets = cfg.webhook_secrets()  # ConfigError propagates: the CLI prints it as one line
    try:
        sock = bind(args.host, args.port)
    except OSError as exc:
        reason = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)
        print(f"scim-pipeline webhooks: cannot listen on {args.host}:{args.port}: {reason}", file=sys.stderr)
        return 1
    app = create_app(cfg.inbox_location, secrets)
    try:
        app.state.inbox.start()  # fail now, in one line, if the inbox cannot be written
    except Exception as exc:
        print(f"scim-pipeline webhooks: cannot open the inbox {app.state.inbox.description}: {exc}", file=sys.stderr)
        sock.close()
        return 1
    log.info("webhook receiver on http://%s:%d%s, inbox %s, %d secret(s)", args.host, args.port, WEBHOOK_PATH,
             app.state.inbox.description, len(secrets))
    try:
        return 0 if serve(app, sock, **SERVER_OPTIONS) else 1
    finally:
        app.state.inbox.close()
        sock.close()
