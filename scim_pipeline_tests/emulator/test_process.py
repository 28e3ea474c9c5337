"""The emulator as a process: its emulator.env, a stable webhook secret, a clear error when the port is taken,
and a clean exit on SIGTERM."""

import socket
import subprocess
import sys

from scim_pipeline.config import read_dotenv
from scim_pipeline_tests.emulator_support import RunningEmulator

ENV_KEYS = {"SCALEKIT_ENVIRONMENT_URL", "SCALEKIT_CLIENT_ID", "SCALEKIT_CLIENT_SECRET", "SCALEKIT_WEBHOOK_SECRET",
            "REQUESTS_CA_BUNDLE", "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH"}


def test_env_file_secret_stability_and_sigterm(home):
    emu = RunningEmulator(home, orgs=1, users_per_org=3)
    env = read_dotenv(home / "emulator.env")
    assert set(env) == ENV_KEYS
    assert env["SCALEKIT_ENVIRONMENT_URL"] == f"https://localhost:{emu.port}"
    assert env["SCALEKIT_WEBHOOK_SECRET"].startswith("whsec_")
    assert env["REQUESTS_CA_BUNDLE"] == env["GRPC_DEFAULT_SSL_ROOTS_FILE_PATH"]
    assert (home / "emulator.env").stat().st_mode & 0o077 == 0
    assert emu.control("GET", "/_emulator/healthz").json()["status"] == "ok"
    log = emu.service.log_path
    assert emu.stop() == 0  # SIGTERM: clean exit
    text = log.read_text()
    for secret in (env["SCALEKIT_CLIENT_SECRET"], env["SCALEKIT_WEBHOOK_SECRET"]):
        assert secret not in text
    again = RunningEmulator(home, orgs=1, users_per_org=3)
    try:
        assert again.env["SCALEKIT_WEBHOOK_SECRET"] == env["SCALEKIT_WEBHOOK_SECRET"]
        assert again.env["SCALEKIT_CLIENT_SECRET"] == env["SCALEKIT_CLIENT_SECRET"]
    finally:
        assert again.stop() == 0


def test_port_taken_is_a_clear_error(home):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "scim_pipeline.cli", "emulator", "--port", str(port), "--orgs", "1",
             "--users-per-org", "2"],
            capture_output=True, text=True, timeout=60, env={**__import__("os").environ, "SCIM_PIPELINE_HOME": str(home)})
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"scim-pipeline emulator: cannot listen on 127.0.0.1:{port}: address already in use"]
    assert not (home / "emulator.env").exists()
