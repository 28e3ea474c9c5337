"""Serving an ASGI app: a real uvicorn in a child process of its own, stopped by real signals."""

from __future__ import annotations

import errno
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import httpx
import pytest

from scim_pipeline.lib.asgi import bind

SERVER = textwrap.dedent('''
    import asyncio, sys
    from contextlib import asynccontextmanager
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from scim_pipeline.lib.asgi import bind, serve

    lifespan, access_log, timeout = sys.argv[1] == "on", sys.argv[2] == "on", float(sys.argv[3]) or None

    async def hello(request):
        return PlainTextResponse("hello")

    async def slow(request):
        await asyncio.sleep(60)
        return PlainTextResponse("late")

    @asynccontextmanager
    async def announce(app):
        print("lifespan start", flush=True)
        yield
        print("lifespan stop", flush=True)

    sock = bind("127.0.0.1", 0)
    print(sock.getsockname()[1], flush=True)
    app = Starlette(routes=[Route("/", hello), Route("/slow", slow)], lifespan=announce)
    served = serve(app, sock, lifespan=lifespan, access_log=access_log, timeout_graceful_shutdown=timeout)
    print("served" if served else "did not serve", flush=True)
''')


def start(lifespan: bool = True, access_log: bool = False, timeout: float = 0) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-c", SERVER, "on" if lifespan else "off", "on" if access_log else "off", str(timeout)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    port = int(process.stdout.readline())
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:  # bound from the start, accepting connections once uvicorn serves
        try:
            assert httpx.get(url, timeout=10).text == "hello"
            return process, url
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                process.kill()
                raise


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("lifespan, access_log", [(True, False), (False, True)])
def test_serves_until_a_signal_then_returns_cleanly(sig, lifespan, access_log):
    process, url = start(lifespan, access_log)
    process.send_signal(sig)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    printed = [line for line in out.splitlines() if not line.startswith("INFO:")]  # uvicorn logs access to stdout
    assert printed == (["lifespan start", "lifespan stop"] if lifespan else []) + ["served"], out + err
    assert ('"GET / HTTP/1.1" 200' in out) == access_log, out


def test_graceful_shutdown_waits_for_requests_in_flight_only_so_long():
    process, url = start(timeout=1)
    with httpx.Client(timeout=60) as http:
        answer: dict = {}
        request = threading.Thread(target=lambda: answer.update(r=_get(http, url + "/slow")))
        request.start()
        time.sleep(0.5)  # the slow request is in flight
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
        request.join(30)
    assert process.returncode == 0, err
    assert time.monotonic() - started < 15  # not the 60 s the request would take
    assert out.splitlines()[-1] == "served"
    assert "timeout graceful shutdown exceeded" in err
    assert answer["r"] != 200  # cut off, not answered


def _get(http: httpx.Client, url: str):
    try:
        return http.get(url).status_code
    except httpx.HTTPError as exc:
        return exc


def test_a_taken_port_fails_at_bind():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError) as info:
            bind("127.0.0.1", port)
    assert info.value.errno == errno.EADDRINUSE


def test_binds_a_free_port_by_name_and_accepts_nothing_before_serving():
    with bind("localhost", 0) as sock:
        assert sock.getsockname()[1] > 0
        # A readiness probe that connects knows that the server is up and handles SIGTERM.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(sock.getsockname()[:2], timeout=5).close()
