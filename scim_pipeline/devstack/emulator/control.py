"""The HTTP/1.1 side of the emulator: Scalekit's ``POST /oauth/token`` and the emulator's control API under
``/_emulator/`` (docs/emulator.md). The control API has no authentication and answers loopback peers only.

Handlers that walk the whole directory (state, prebuild) are plain functions, which Starlette runs in its thread
pool, so the event loop keeps piping gRPC bytes meanwhile.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import time
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from scim_pipeline.devstack.emulator.gateway import FaultError
from scim_pipeline.devstack.emulator.mutations import MutationError

if TYPE_CHECKING:
    from scim_pipeline.devstack.emulator.server import Emulator


def _error(status: int, error: str, description: str) -> JSONResponse:
    return JSONResponse({"error": error, "error_description": description}, status_code=status)


def _loopback(client) -> bool:
    host = client[0] if client else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def _json_body(request: Request):
    try:
        return json.loads(await request.body() or b"null")
    except ValueError:
        return _error(400, "invalid_request", "the body is not valid JSON")


def build_app(emulator: "Emulator"):
    """The ASGI app: Starlette routes behind a loopback guard for ``/_emulator/``."""
    async def token(request: Request) -> Response:
        # client_secret_post (what the SDK sends) or client_secret_basic.
        form = {k: v[0] for k, v in parse_qs((await request.body()).decode("utf-8", "replace")).items()}
        client_id, client_secret = form.get("client_id", ""), form.get("client_secret", "")
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("basic "):
            try:
                client_id, _, client_secret = base64.b64decode(auth[6:]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                return _error(401, "invalid_client", "malformed basic credentials")
        if form.get("grant_type") != "client_credentials":
            return _error(400, "unsupported_grant_type", "only client_credentials is supported")
        if not emulator.credentials.matches(client_id, client_secret):
            return _error(401, "invalid_client", "client authentication failed")
        return JSONResponse({
            "access_token": emulator.tokens.issue(), "token_type": "Bearer",
            "expires_in": emulator.tokens.ttl, "scope": "openid",
        }, headers={"cache-control": "no-store"})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok", "port": emulator.port, "grpc_port": emulator.grpc_port,
                             "router_pid": emulator.router_pid,
                             "uptime_s": round(time.monotonic() - emulator.started, 3)})

    def state(request: Request) -> Response:
        org = request.query_params.get("organization_id")
        if org and org not in emulator.store.organizations:
            return _error(404, "not_found", f"unknown organization_id {org!r}")
        return Response(json.dumps(emulator.store.truth(org), separators=(",", ":")), media_type="application/json")

    async def mutations(request: Request) -> Response:
        body = await _json_body(request)
        if isinstance(body, Response):
            return body
        try:
            applied = await run_in_threadpool(emulator.mutate, body)
        except MutationError as exc:
            return _error(400, "invalid_mutation", str(exc))
        return JSONResponse({"results": [a.result() for a in applied]})

    async def faults(request: Request) -> Response:
        if request.method == "GET":
            return JSONResponse(emulator.faults.faults.as_dict())
        body = await _json_body(request)
        if isinstance(body, Response):
            return body
        if not isinstance(body, dict):
            return _error(400, "invalid_request", "the body must be a JSON object of fault settings")
        try:
            current = emulator.faults.update(body)
        except FaultError as exc:
            return _error(400, "invalid_fault", str(exc))
        return JSONResponse(current.as_dict())

    async def webhook(request: Request) -> Response:
        if request.method == "GET":
            return JSONResponse(emulator.sender.status())
        body = await _json_body(request)
        if isinstance(body, Response):
            return body
        url = body.get("url") if isinstance(body, dict) else None
        if url is not None and (not isinstance(url, str) or not url.startswith(("http://", "https://"))):
            return _error(400, "invalid_request", "url must be an http(s) URL or null")
        emulator.sender.set_url(url)
        return JSONResponse({"url": emulator.sender.url})

    async def events(request: Request) -> Response:
        return JSONResponse({"events": emulator.recent_events_json()})

    def prebuild(request: Request) -> Response:
        started = time.perf_counter()
        count = emulator.prebuild(detail=request.query_params.get("include_detail", "true") != "false")
        return JSONResponse({"users": count, "seconds": round(time.perf_counter() - started, 3)})

    app = Starlette(routes=[
        Route("/oauth/token", token, methods=["POST"]),
        Route("/_emulator/healthz", healthz, methods=["GET"]),
        Route("/_emulator/state", state, methods=["GET"]),
        Route("/_emulator/mutations", mutations, methods=["POST"]),
        Route("/_emulator/faults", faults, methods=["GET", "POST"]),
        Route("/_emulator/webhook", webhook, methods=["GET", "POST"]),
        Route("/_emulator/events", events, methods=["GET"]),
        Route("/_emulator/prebuild", prebuild, methods=["POST"]),
    ])

    async def loopback_only(scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/_emulator/") and not _loopback(scope.get("client")):
            response = _error(403, "forbidden", "the control API answers loopback clients only")
            await response(scope, receive, send)
            return
        await app(scope, receive, send)

    return loopback_only
