"""The emulator as a process: its emulator.env, a stable webhook secret, a clear error when the port is taken,
and a clean exit on SIGTERM."""

import os
import socket
import subprocess
import sys

from scim_pipeline.config import read_dotenv
from scim_pipeline_tests.devstack.demo_app.helpers import wait_until
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
            capture_output=True, text=True, timeout=60, env={**os.environ, "SCIM_PIPELINE_HOME": str(home)})
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"scim-pipeline emulator: cannot listen on 127.0.0.1:{port}: address already in use"]
    assert not (home / "emulator.env").exists()


def test_port_zero_picks_a_free_port_and_sigterm_exits_zero(home):
    import signal
    import time

    process = subprocess.Popen(
        [sys.executable, "-m", "scim_pipeline.cli", "emulator", "--port", "0", "--orgs", "1", "--users-per-org", "2"],
        env={**os.environ, "SCIM_PIPELINE_HOME": str(home)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (home / "emulator.env").exists() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
        url = read_dotenv(home / "emulator.env")["SCALEKIT_ENVIRONMENT_URL"]
        port = int(url.rsplit(":", 1)[1])
        assert port > 0
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_router_process_never_outlives_the_emulator(home):
    """The router (a process of its own) exits when the emulator is killed with SIGKILL, freeing the port."""
    emu = RunningEmulator(home, orgs=1, users_per_org=3)
    router_pid = emu.control("GET", "/_emulator/healthz").json()["router_pid"]
    assert router_pid and router_pid != emu.service.process.pid and _pid_alive(router_pid)
    emu.service.kill()

    def port_free() -> bool:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no owner
            try:
                probe.bind(("127.0.0.1", emu.port))
                probe.listen()
            except OSError:
                return False
            return True

    assert wait_until(lambda: not _pid_alive(router_pid), 10), "the router outlived a killed emulator"
    assert wait_until(port_free, 10)


def test_a_router_that_dies_stops_the_emulator_with_an_error(home):
    import signal

    emu = RunningEmulator(home, orgs=1, users_per_org=3)
    router_pid = emu.control("GET", "/_emulator/healthz").json()["router_pid"]
    os.kill(router_pid, signal.SIGKILL)
    assert emu.service.process.wait(20) == 1  # not a server that silently answers nothing
    assert "router process exited" in emu.service.log_tail()


def test_silent_and_non_tls_clients_do_not_disturb_the_others(home):
    """A client that never sends its ClientHello, and one that speaks plain HTTP, are dealt with (closed) while
    the SDK's token requests (handed to the emulator's HTTP side) and gRPC calls (piped) go on."""
    with RunningEmulator(home, orgs=1, users_per_org=3) as emu:
        silent = socket.create_connection(("127.0.0.1", emu.port))
        plain = socket.create_connection(("127.0.0.1", emu.port), timeout=10)
        try:
            plain.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert plain.recv(100) == b""  # not TLS: closed without an answer
            client = emu.client()
            orgs = client.organization.list_organizations()[0].organizations
            assert len(orgs) == 1
            assert emu.control("GET", "/_emulator/healthz").json()["status"] == "ok"
        finally:
            silent.close()
            plain.close()


def test_ctrl_c_to_the_process_group_is_a_clean_stop(home):
    """Ctrl-C in a terminal reaches the emulator and its router at once: the router leaves stopping to the
    emulator, which exits 0 (a router that quit first would have looked like a crash)."""
    import signal

    emu = RunningEmulator(home, orgs=1, users_per_org=3)  # started in a session of its own, like a terminal's job
    router_pid = emu.control("GET", "/_emulator/healthz").json()["router_pid"]
    os.killpg(emu.service.process.pid, signal.SIGINT)
    assert emu.service.process.wait(20) == 0
    assert wait_until(lambda: not _pid_alive(router_pid), 10)
