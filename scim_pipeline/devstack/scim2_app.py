"""A SCIM 2.0 application for demos and tests: ``scim2-server`` (the python-scim project's reference server) in a
process of its own, a tenant per organization (created on its first request, under ``/{organization_id}/v2``),
accepting one bearer token; and its contents read back over SCIM in the demo application's ``GET /state`` shape, so
that the convergence oracle (``devstack/convergence.py``) judges either application the same way.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from scim_pipeline.config import Scim2Settings
from scim_pipeline.devstack import services


@dataclass
class Scim2App:
    """A running ``scim2-server``: ``url`` is the template of its tenants' base URLs."""

    service: services.Service
    token: str = field(repr=False)

    @property
    def url(self) -> str:
        return f"{self.service.url}/{{organization_id}}/v2"

    def settings(self) -> Scim2Settings:
        return Scim2Settings(self.url, self.token)

    def env(self) -> dict[str, str]:
        """The pipeline's settings for this application."""
        return {"SCIM_PIPELINE_APP_PROTOCOL": "scim2", "SCIM_PIPELINE_APP_URL": self.url,
                "SCIM_PIPELINE_APP_TOKEN": self.token}

    def client(self, organization_id: str) -> httpx.Client:
        return httpx.Client(base_url=self.url.replace("{organization_id}", organization_id), trust_env=False,
                            headers={"authorization": f"Bearer {self.token}"}, timeout=10)

    def state(self, organization_ids: list[str]) -> dict:
        return read_state(self.settings(), organization_ids)

    def stop(self) -> None:
        self.service.stop()

    def __enter__(self) -> "Scim2App":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_scim2_server(home: Path, port: int | None = None, token: str | None = None,
                       config_file: Path | None = None, timeout: float = 30.0) -> Scim2App:
    """Start ``scim2-server`` with dynamic tenants and a bearer token (drawn when not given); its log goes to
    ``home/logs/scim2-server.log``. ``config_file``: a ServiceProviderConfig to announce instead of the default
    (every feature)."""
    port = port or services.free_port()
    token = token or secrets.token_urlsafe(24)
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / "scim2-server.log"
    args = [sys.executable, "-c", "from scim2_server.testserver.cli import main; main()", "--port", str(port),
            "--dynamic-tenants", f"--bearer-token={token}"]  # one argument: a token may begin with "-"
    if config_file is not None:
        args += ["--service-provider-config", str(config_file)]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    service = services.Service("scim2-server", port, process, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"scim2-server exited with code {process.returncode}:\n{service.log_tail()}")
        if services.port_open("127.0.0.1", port):
            return Scim2App(service, token)
        time.sleep(0.05)
    service.stop()
    raise RuntimeError(f"scim2-server did not become ready within {timeout:.0f}s:\n{service.log_tail()}")


def _all(client: httpx.Client, endpoint: str) -> list[dict]:
    resources, start = [], 1
    while True:
        response = client.get(endpoint, params={"startIndex": start, "count": 1000})
        response.raise_for_status()
        page = response.json()
        batch = page.get("Resources") or []
        resources += batch
        start += len(batch)
        if not batch or start > page.get("totalResults", 0):
            return resources


def read_state(settings: Scim2Settings, organization_ids: list[str]) -> dict:
    """What the SCIM application holds, in the demo application's ``GET /state`` shape (users by ``externalId``,
    memberships from the groups' members, roles from the users' ``roles``), plus ``groups``:
    ``{"organization_id", "group_id", "display_name", "members"}``."""
    state: dict[str, list] = {"users": [], "memberships": [], "roles": [], "groups": []}
    for org in organization_ids:
        base = settings.url.replace("{organization_id}", org)
        headers = {"authorization": f"Bearer {settings.token}"} if settings.token else {}
        with httpx.Client(base_url=base, headers=headers, trust_env=False, timeout=30) as client:
            users = _all(client, "/Users")
            groups = _all(client, "/Groups")
        external = {u["id"]: u.get("externalId") for u in users}
        for u in users:
            emails = sorted(u.get("emails") or [], key=lambda e: not e.get("primary"))
            state["users"].append({
                "organization_id": org, "user_id": u.get("externalId"), "scim_id": u["id"],
                "user_name": u.get("userName"), "email": emails[0]["value"] if emails else None,
                "given_name": (u.get("name") or {}).get("givenName"),
                "family_name": (u.get("name") or {}).get("familyName"), "active": u.get("active", True)})
            state["roles"] += [{"organization_id": org, "user_id": u.get("externalId"), "role_name": r["value"]}
                               for r in u.get("roles") or []]
        for g in groups:
            members = [external.get(m["value"], m["value"]) for m in g.get("members") or []]
            state["groups"].append({"organization_id": org, "group_id": g.get("externalId"),
                                    "display_name": g.get("displayName"), "members": sorted(members)})
            state["memberships"] += [{"organization_id": org, "group_id": g.get("externalId"), "user_id": m}
                                     for m in members]
    return state
