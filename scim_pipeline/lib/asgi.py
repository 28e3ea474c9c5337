"""Serving an ASGI app with uvicorn, as each of the package's HTTP services does: ``bind`` first, so that a taken
port is one clear error before anything else starts, then ``serve`` until SIGTERM or SIGINT, which end in a graceful
shutdown and a normal return (exit code 0), not in death by signal."""

from __future__ import annotations

import signal
import socket

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host`` (a name or an IPv4/IPv6 address) and ``port`` (0: a free one, which
    ``getsockname()`` tells). A taken port raises OSError (``EADDRINUSE``) here, for the caller to report."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        # A restarted service can take its port back while connections of the previous one are in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Not listening yet: uvicorn does when it starts serving, so that a client able to connect (a readiness
        # probe) talks to a server that already handles SIGTERM, and no connection waits on one still starting.
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


def serve(app, sock: socket.socket, *, lifespan: bool, access_log: bool,
          timeout_graceful_shutdown: float | None = None, **uvicorn_options) -> bool:
    """Run ``app`` with uvicorn on ``sock`` (from ``bind``; closed on return) until SIGTERM or SIGINT; True if it
    served. Call it from the main thread. ``timeout_graceful_shutdown`` bounds the wait for requests in flight (None:
    no bound); ``uvicorn_options`` go to ``uvicorn.Config``, over ``log_level="info"`` and ``ws="none"``."""
    import uvicorn  # loaded by the processes that serve, not by every importer of a service's module

    options = {"log_level": "info", "ws": "none", **uvicorn_options}  # none of the services speaks WebSocket
    server = uvicorn.Server(uvicorn.Config(
        app, lifespan="on" if lifespan else "off", access_log=access_log,
        timeout_graceful_shutdown=timeout_graceful_shutdown, **options,
    ))

    def stop(signum, frame) -> None:
        server.should_exit = True

    # Uvicorn handles these signals while it serves and raises them again once shut down, against whatever handler
    # was there before: with these, that ends in a normal return rather than death by signal, and a signal that
    # comes before uvicorn has put its own handlers in place still stops the server.
    previous = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return server.started
