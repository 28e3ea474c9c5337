"""Running the demo application as a user would (its own process, on 127.0.0.1) and speaking its protocol by hand."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import httpx
from standardwebhooks import Webhook

from scim_pipeline.config import read_dotenv
from scim_pipeline.devstack import services


@dataclass
class RunningApp:
    service: services.Service
    url: str
    secret: str
    http: httpx.Client

    def post(self, payload, *, headers: dict | None = None, secret: str | None = None,
             timestamp: datetime | None = None, key: str | None = None) -> httpx.Response:
        """POST a batch signed like the pipeline signs it (or with ``secret``/``timestamp`` to get it wrong)."""
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        batch_id = payload.get("batch_id", "b") if isinstance(payload, dict) else "b"
        if headers is None:
            headers = sign(secret or self.secret, body, msg_id=f"msg_{batch_id}", timestamp=timestamp)
            headers["idempotency-key"] = key or batch_id
        return self.http.post("/scim/changes", content=body, headers={"content-type": "application/json", **headers})

    def state(self, organization_id: str | None = None) -> dict:
        params = {"organization_id": organization_id} if organization_id else None
        return self.http.get("/state", params=params).raise_for_status().json()

    def stats(self) -> dict:
        return self.http.get("/stats").raise_for_status().json()


def sign(secret: str, body: bytes, msg_id: str = "msg_1", timestamp: datetime | None = None) -> dict[str, str]:
    when = timestamp or datetime.now(tz=timezone.utc)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(when.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, when, body.decode()),
    }


def app_env(home: Path) -> dict[str, str]:
    return read_dotenv(home / "app.env")


def _healthy(service: services.Service) -> bool:
    try:
        return httpx.get(f"{service.url}/healthz", timeout=1, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def running_app(home: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[RunningApp]:
    service = services.start("app", list(args), home, ready=_healthy, env=env, timeout=30)
    try:
        values = app_env(home)
        secret = (env or {}).get("SCIM_PIPELINE_APP_SECRET") or values["SCIM_PIPELINE_APP_SECRET"]
        with httpx.Client(base_url=values["SCIM_PIPELINE_APP_URL"], timeout=10, trust_env=False) as http:
            yield RunningApp(service, values["SCIM_PIPELINE_APP_URL"], secret, http)
    finally:
        service.stop()


def user(user_id: str, email: str | None = None, **attrs) -> dict:
    return {"user_id": user_id, "email": email or f"{user_id}@example.com", "given_name": user_id.title(),
            "family_name": "Doe", "preferred_username": user_id, "active": True, **attrs}


def change(change_id: str, entity: str, op: str, data: dict, key: str | None = None) -> dict:
    if key is None:
        key = {"user": lambda: data["user_id"], "membership": lambda: f"{data['group_id']}/{data['user_id']}",
               "role": lambda: f"{data['user_id']}/{data['role_name']}"}.get(entity, lambda: "x")()
    return {"change_id": change_id, "entity": entity, "op": op, "key": key, "data": data}


def wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()
