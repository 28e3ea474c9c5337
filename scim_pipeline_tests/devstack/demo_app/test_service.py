"""The demo application as a process: its secret and app.env, clean shutdown, a taken port, injected faults."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys

from scim_pipeline.config import settings
from scim_pipeline_tests.devstack.demo_app.helpers import app_env, change, running_app, user


def run_app(home, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``scim-pipeline app`` in the foreground, for commands expected to exit at once."""
    child_env = {**os.environ, "SCIM_PIPELINE_HOME": str(home), **(env or {})}
    return subprocess.run([sys.executable, "-m", "scim_pipeline.cli", "app", *args], env=child_env,
                          capture_output=True, text=True, timeout=30)


def test_generates_a_secret_writes_app_env_and_stops_cleanly(home):
    with running_app(home) as app:
        values = app_env(home)
        assert values["SCIM_PIPELINE_APP_SECRET"].startswith("whsec_")
        assert values["SCIM_PIPELINE_APP_URL"] == f"http://127.0.0.1:{app.service.port}"
        assert stat.S_IMODE((home / "app.env").stat().st_mode) == 0o600
        # The pipeline finds both through its settings.
        assert settings().app_url() == app.url and settings().app_secret() == app.secret
        assert (home / "app.sqlite").exists()
        app.service.stop()
        assert app.service.process.returncode == 0
    log = app.service.log_path.read_text()
    assert app.secret not in log and app.secret.removeprefix("whsec_") not in log
    assert "stopped" in log


def test_keeps_its_secret_across_restarts(home):
    with running_app(home) as first:
        pass
    with running_app(home) as second:
        assert second.secret == first.secret


def test_a_secret_from_the_environment_is_used_and_not_written(home):
    secret = "whsec_" + "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0"
    with running_app(home, env={"SCIM_PIPELINE_APP_SECRET": secret}) as app:
        assert "SCIM_PIPELINE_APP_SECRET" not in app_env(home)
        r = app.post({"batch_id": "b", "organization_id": "o", "changes": [change("c1", "user", "create", user("u"))]})
        assert r.status_code == 200


def test_configuration_and_port_errors_are_one_line(home):
    bad = run_app(home, "--port", "0", env={"SCIM_PIPELINE_APP_SECRET": "not-a-secret"})
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "scim-pipeline app: configuration error: SCIM_PIPELINE_APP_SECRET is malformed: "
        "expected a secret of the form whsec_<base64>"]
    rate = run_app(home, "--port", "0", "--fail-rate", "0.8", "--rate-limit-rate", "0.5")
    assert rate.returncode == 2 and len(rate.stderr.strip().splitlines()) == 1

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = run_app(home, "--port", str(port))
    assert busy.returncode == 1
    assert busy.stderr.strip().splitlines() == [f"scim-pipeline app: cannot listen on 127.0.0.1:{port}: Address already in use"]


def test_injected_faults_fail_before_or_after_applying(home):
    with running_app(home, "--fail-rate", "1.0", env={"SCIM_PIPELINE_APP_SEED": "3"}) as app:
        codes = []
        for i in range(12):
            payload = {"batch_id": f"b{i}", "organization_id": "o", "changes": [change(f"c{i}", "user", "create", user(f"u{i}"))]}
            codes.append(app.post(payload).status_code)
        stats = app.stats()
    assert codes == [500] * 12
    faults = stats["faults"]
    assert faults["failed_before"] > 0 and faults["failed_after"] > 0 and faults["rate_limited"] == 0
    # Only the requests that failed after committing were applied: their answers were lost, not their effects.
    assert stats["batches"] == faults["failed_after"] == stats["changes_applied"]

    with running_app(home, "--rate-limit-rate", "1.0") as app:
        r = app.post({"batch_id": "x", "organization_id": "o", "changes": []})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
