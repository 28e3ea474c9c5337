"""A throwaway PostgreSQL server for the tests and benchmarks: ``initdb`` in a temporary folder, ``postgres`` on a
free port of 127.0.0.1, removed on ``stop()``. It uses the machine's PostgreSQL packages; nothing is downloaded.

PostgreSQL refuses to run as root, so when this process is root the server runs as an unprivileged user (the
packages' ``postgres`` user, else ``nobody``) that owns the folder. TCP connections need the password (SCRAM), so a
wrong password is refused as on a real server.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from scim_pipeline.devstack.services import free_port

USER = "scim"


def bin_dir() -> Path | None:
    """The folder of ``initdb`` and ``postgres``: on PATH, else ``pg_config --bindir``, else Debian's layout
    (``/usr/lib/postgresql/<version>/bin``, the newest). None when no PostgreSQL server is installed."""
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=True).stdout.strip()
            if (Path(out) / "initdb").is_file():
                return Path(out)
        except (OSError, subprocess.CalledProcessError):
            pass
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(debian[-1]).parent if debian else None


def _unprivileged() -> pwd.struct_passwd | None:
    """The user to run the server as when this process is root; None when it is not root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("running as root, and neither a postgres nor a nobody user exists to run PostgreSQL as")


class PostgresServer:
    def __init__(self, settings: dict[str, str] | None = None):
        self.bin = bin_dir()
        if self.bin is None:
            raise FileNotFoundError("no PostgreSQL server installed (initdb not found)")
        self.settings = settings or {}
        self._as = _unprivileged()
        self.root = Path(tempfile.mkdtemp(prefix="scim-pg-", dir=self._parent()))
        self.data = self.root / "data"
        self.password = os.urandom(12).hex()
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    def _parent(self) -> str | None:
        """Where the folder goes: the usual temporary folder, unless the server's user could not reach into it."""
        folder = Path(tempfile.gettempdir()).resolve()
        if self._as is None or all(p.stat().st_mode & 0o001 for p in (folder, *folder.parents)):
            return None
        return "/tmp"

    def _command(self, *args: str) -> list[str]:
        if self._as is None:
            return list(args)
        return ["setpriv", f"--reuid={self._as.pw_uid}", f"--regid={self._as.pw_gid}", "--clear-groups", *args]

    def url(self, database: str = "postgres", password: str | None = None) -> str:
        return f"postgresql://{USER}:{password or self.password}@127.0.0.1:{self.port}/{database}"

    def start(self, timeout: float = 60.0) -> "PostgresServer":
        pwfile = self.root / "pw"
        pwfile.write_text(self.password)
        if self._as is not None:
            os.chown(self.root, self._as.pw_uid, self._as.pw_gid)
            os.chown(pwfile, self._as.pw_uid, self._as.pw_gid)
        subprocess.run(self._command(str(self.bin / "initdb"), "-D", str(self.data), "-U", USER, "--pwfile",
                                     str(pwfile), "--auth-host=scram-sha-256", "--auth-local=trust",
                                     "--encoding=UTF8", "--locale=C"),
                       check=True, capture_output=True)
        self._launch(timeout)
        return self

    def restart(self, timeout: float = 60.0) -> None:
        """Stop the server (fast shutdown: clients are disconnected) and start it again on the same data and port."""
        self._shutdown()
        self._launch(timeout)

    def _launch(self, timeout: float) -> None:
        options = {"listen_addresses": "127.0.0.1", "port": str(self.port), "unix_socket_directories": str(self.root),
                   "max_connections": "200", **self.settings}
        args = [x for k, v in options.items() for x in ("-c", f"{k}={v}")]
        log = open(self.root / "postgres.log", "ab")
        self.process = subprocess.Popen(self._command(str(self.bin / "postgres"), "-D", str(self.data), *args),
                                        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("PostgreSQL did not start:\n" + self.log_tail())
            time.sleep(0.1)

    def ready(self) -> bool:
        import psycopg2

        try:
            psycopg2.connect(self.url(), connect_timeout=1).close()
            return True
        except psycopg2.OperationalError:
            return False

    def create_database(self, name: str) -> str:
        """A new empty database; its URL."""
        import psycopg2

        conn = psycopg2.connect(self.url())
        try:
            conn.autocommit = True
            conn.cursor().execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return self.url(name)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join((self.root / "postgres.log").read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def _shutdown(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # "fast" shutdown: disconnects clients (SIGTERM waits for them)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def stop(self) -> None:
        self._shutdown()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "PostgresServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
