"""Start and stop the product's own services (emulator, webhook receiver, demo application) as child processes.

Used by ``demo``/``dev`` and by the test suite, so that both run the services exactly as a user would:
``scim-pipeline <service> --port N`` in a process of its own, with its output in a log file.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class Service:
    name: str
    port: int
    process: subprocess.Popen
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        """SIGKILL: for tests of what survives a crash."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def __enter__(self) -> "Service":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start(
    name: str,
    args: list[str],
    home: Path,
    port: int | None = None,
    ready: Callable[["Service"], bool] | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 60.0,
) -> Service:
    """Run ``scim-pipeline <name> --port PORT <args>`` with ``SCIM_PIPELINE_HOME=home`` and wait until ``ready``
    (default: the port accepts connections). Raises RuntimeError with the log's tail if it dies or times out."""
    port = port or free_port()
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{name}.log"
    child_env = {**os.environ, **(env or {}), "SCIM_PIPELINE_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    log = open(log_path, "ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "scim_pipeline.cli", name, "--port", str(port), *args],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=child_env,
        start_new_session=True,  # Ctrl-C in a terminal reaches the parent, which stops its children in order
    )
    log.close()
    service = Service(name, port, process, log_path)
    ready = ready or (lambda s: port_open("127.0.0.1", s.port))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with code {process.returncode}:\n{service.log_tail()}")
        if ready(service):
            return service
        time.sleep(0.05)
    service.stop()
    raise RuntimeError(f"{name} did not become ready within {timeout:.0f}s:\n{service.log_tail()}")
