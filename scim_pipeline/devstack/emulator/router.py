"""One TLS port for everything the SDK speaks, routed by ALPN: ``http/1.1`` preferred, then ``h2``.

The router reads the ALPN protocols the client offers in its (plain-text) TLS ClientHello, peeking at it without
consuming it, and without decrypting:

* a client offering ``h2`` but not ``http/1.1`` (the SDK's gRPC channel) is piped, still encrypted, to the internal
  gRPC server, which terminates TLS itself (in C) with the same certificate and selects ``h2``;
* any other client (the SDK's token request through ``requests``, curl, browsers) is handed over, socket and all, to
  the emulator's process, which terminates TLS there (selecting ``http/1.1``) and serves the token endpoint and the
  control API through uvicorn's HTTP/1.1 protocol; the socket is the client's own, so its address is the real one
  (the control API answers loopback peers only).

That is the same choice as a TLS server offering ``http/1.1`` first and ``h2`` second would make, but gRPC bytes are
never decrypted in Python: terminating TLS here cost about 1.4 ms per 40 KB page, more than the page itself.

The router runs in a process of its own (``python -m scim_pipeline.devstack.emulator.router``): piped through the
emulator's own event loop, every page waited for the GIL behind the gRPC handler threads, about 0.7 ms a page, a
third of a listing's time. The emulator binds the port (so that a taken port is its own clear error), passes the
listening socket to the router, and receives HTTP connections back over a Unix socket (``SCM_RIGHTS``). The router
exits when that socket closes, so it never outlives the emulator, even one killed with SIGKILL; and the emulator
stops with an error if the router dies, rather than hold a port nobody answers.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import ssl
import subprocess
import sys
from typing import Callable

log = logging.getLogger(__name__)

_MAX_HELLO = 5 + 16384 + 64  # one TLS record, which holds any ClientHello an SDK sends
HELLO_TIMEOUT_S = 10.0


def offered_alpn(buffer: bytes) -> list[str] | None:
    """The ALPN protocols offered in the ClientHello at the start of ``buffer``; None while the first record is
    incomplete; [] when this is not a TLS ClientHello or it offers no ALPN."""
    if len(buffer) < 5:
        return None
    if buffer[0] != 0x16:  # not a TLS handshake record
        return []
    end = 5 + int.from_bytes(buffer[3:5], "big")
    if len(buffer) < end:
        return None
    try:
        body = buffer[5:end]
        if body[0] != 0x01:  # not a ClientHello
            return []
        hello = body[4:4 + int.from_bytes(body[1:4], "big")]
        p = 2 + 32                                        # legacy version, random
        p += 1 + hello[p]                                 # session id
        p += 2 + int.from_bytes(hello[p:p + 2], "big")    # cipher suites
        p += 1 + hello[p]                                 # compression methods
        stop = p + 2 + int.from_bytes(hello[p:p + 2], "big")
        p += 2
        while p + 4 <= stop:
            kind = int.from_bytes(hello[p:p + 2], "big")
            size = int.from_bytes(hello[p + 2:p + 4], "big")
            if kind == 16:  # application_layer_protocol_negotiation
                names, q = [], p + 6
                while q < p + 4 + size:
                    n = hello[q]
                    names.append(bytes(hello[q + 1:q + 1 + n]).decode("latin-1"))
                    q += 1 + n
                return names
            p += 4 + size
    except IndexError:
        pass
    return []


class _Pipe(asyncio.Protocol):
    """One side of a byte pipe; ``peer`` is the protocol of the other side; ``open_pipes`` holds it while connected."""

    def __init__(self, open_pipes: "set[_Pipe]", peer: "_Pipe | None" = None):
        self.open_pipes = open_pipes
        self.peer = peer
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport):
        self.transport = transport
        self.open_pipes.add(self)

    def data_received(self, data):
        self.peer.transport.write(data)

    def eof_received(self):
        other = self.peer.transport if self.peer is not None else None
        if other is not None and not other.is_closing() and other.can_write_eof():
            other.write_eof()
        return True

    def connection_lost(self, exc):
        self.open_pipes.discard(self)
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    # The other side's buffer is full: stop reading here until it drains.
    def pause_writing(self):
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self):
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class _Routing:
    """The router process: accepts on the listening socket it was given, routes each connection by its ClientHello."""

    def __init__(self, listener: socket.socket, handoff: socket.socket, grpc_port: int):
        self.listener, self.handoff, self.grpc_port = listener, handoff, grpc_port
        self.pipes: set[_Pipe] = set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        # The emulator's end of the hand-off socket closes when it stops or dies, and only that stops the router.
        # Signals sent to the whole process group (Ctrl-C, a supervisor's SIGTERM) are the emulator's to act on:
        # a router that quit first would look like a crash to it.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        loop.add_reader(self.handoff.fileno(), stop.set)
        accepting = loop.create_task(self._accept())
        await stop.wait()
        loop.remove_reader(self.handoff.fileno())
        accepting.cancel()
        self.listener.close()
        for pipe in list(self.pipes):
            pipe.transport.close()

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        self.listener.setblocking(False)
        while True:
            try:
                sock, _ = await loop.sock_accept(self.listener)
            except OSError as exc:  # e.g. out of file descriptors: keep serving the connections there are
                log.warning("accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            sock.setblocking(False)
            _keep(loop.create_task(self.route(sock)))

    async def route(self, sock: socket.socket) -> None:
        try:
            hello = await asyncio.wait_for(_peek_hello(sock), HELLO_TIMEOUT_S)
        except (asyncio.TimeoutError, OSError):
            sock.close()  # a client that never completes its ClientHello must not hold a connection open forever
            return
        if not hello:  # closed before saying anything
            sock.close()
            return
        offered = offered_alpn(hello) or []
        if "h2" in offered and "http/1.1" not in offered:
            await self._pipe_to_grpc(sock)
            return
        try:
            socket.send_fds(self.handoff, [b"c"], [sock.fileno()])
        except OSError as exc:
            log.warning("cannot hand a connection to the emulator: %s", exc)
        sock.close()  # the emulator has its own descriptor of the connection now

    async def _pipe_to_grpc(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        client = _Pipe(self.pipes)
        try:
            # The gRPC server never speaks first, so the upstream is ready before the client's bytes flow.
            _, upstream = await loop.create_connection(lambda: _Pipe(self.pipes, client), "127.0.0.1",
                                                       self.grpc_port)
        except OSError as exc:
            log.warning("cannot reach the internal gRPC server: %s", exc)
            sock.close()
            return
        client.peer = upstream
        try:
            await loop.connect_accepted_socket(lambda: client, sock)
        except OSError:  # the client went away meanwhile
            upstream.transport.close()
            sock.close()


_tasks: set[asyncio.Task] = set()


def _keep(task: asyncio.Task) -> None:
    """Hold a reference to a fire-and-forget task until it is done (the event loop keeps only a weak one)."""
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


async def _peek_hello(sock: socket.socket) -> bytes:
    """The start of the connection's first TLS record, read with MSG_PEEK so that whoever serves the connection
    reads it again from the start."""
    loop = asyncio.get_running_loop()
    while True:
        readable = loop.create_future()
        loop.add_reader(sock.fileno(), lambda: readable.done() or readable.set_result(None))
        try:
            await readable
        finally:
            loop.remove_reader(sock.fileno())
        data = sock.recv(_MAX_HELLO, socket.MSG_PEEK)
        if not data or offered_alpn(data) is not None or len(data) >= _MAX_HELLO:
            return data
        await asyncio.sleep(0.005)  # a partial record: peeked bytes keep the socket readable, so wait a little


def event_loop_runner():
    try:
        import uvloop  # a faster loop when available (the router's pipes, the emulator); plain asyncio otherwise
        return uvloop.run
    except ImportError:
        return asyncio.run


def router_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The emulator's ALPN router (started by the emulator).")
    parser.add_argument("--listen-fd", type=int, required=True)
    parser.add_argument("--handoff-fd", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    listener = socket.socket(fileno=args.listen_fd)
    handoff = socket.socket(fileno=args.handoff_fd)
    event_loop_runner()(_Routing(listener, handoff, args.grpc_port).run())
    return 0


class AlpnRouter:
    """The emulator's side of the router: binds the port, runs the router process, serves the HTTP connections the
    router hands back (TLS terminated here, with ``http_ssl_context``)."""

    def __init__(self, http_ssl_context: ssl.SSLContext, grpc_port: int,
                 http_protocol_factory: Callable[[], asyncio.Protocol]):
        self.http_ssl_context = http_ssl_context
        self.grpc_port = grpc_port
        self.http_protocol_factory = http_protocol_factory
        self.listener: socket.socket | None = None
        self.process: subprocess.Popen | None = None
        self.handoff: socket.socket | None = None

    def bind(self, host: str, port: int) -> int:
        """Bind and listen (raising OSError if the port is taken); returns the bound port. Connections wait in the
        backlog until the router process accepts them."""
        self.listener = socket.create_server((host, port), backlog=256)
        return self.listener.getsockname()[1]

    def serve(self, on_router_exit: Callable[[], None]) -> int:
        """Start the router process and return its pid; ``on_router_exit`` is called if it ever stops while the
        emulator runs."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "scim_pipeline.devstack.emulator.router", "--listen-fd", str(self.listener.fileno()),
                 "--handoff-fd", str(theirs.fileno()), "--grpc-port", str(self.grpc_port)],
                pass_fds=(self.listener.fileno(), theirs.fileno()), stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
            self.listener.close()  # the router owns it now
        self.handoff = ours
        ours.setblocking(False)
        asyncio.get_running_loop().add_reader(ours.fileno(), self._receive, on_router_exit)
        return self.process.pid

    def _receive(self, on_router_exit: Callable[[], None]) -> None:
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.handoff, 1, 1)
        except BlockingIOError:
            return
        except OSError:
            data, fds = b"", []
        if not data and not fds:  # the router process is gone
            asyncio.get_running_loop().remove_reader(self.handoff.fileno())
            code = self.process.poll()  # None when it has not been reaped yet
            log.error("the emulator's router process exited%s", "" if code is None else f" with code {code}")
            on_router_exit()
            return
        for fd in fds:
            sock = socket.socket(fileno=fd)
            sock.setblocking(False)
            _keep(asyncio.get_running_loop().create_task(self._serve_http(sock)))

    async def _serve_http(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(self.http_protocol_factory, sock, ssl=self.http_ssl_context,
                                               ssl_handshake_timeout=10)
        except (OSError, ssl.SSLError, asyncio.TimeoutError, ConnectionError) as exc:
            log.debug("TLS handshake failed: %s", exc)
            sock.close()

    async def close(self) -> None:
        """Stop the router process (closing the hand-off socket tells it to; it closes the connections it pipes)."""
        if self.handoff is not None:
            asyncio.get_running_loop().remove_reader(self.handoff.fileno())
            self.handoff.close()
        if self.process is not None:
            try:
                await asyncio.to_thread(self.process.wait, 5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                await asyncio.to_thread(self.process.wait)
        elif self.listener is not None:
            self.listener.close()


if __name__ == "__main__":
    sys.exit(router_main())
