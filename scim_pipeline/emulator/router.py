"""One TLS port for everything the SDK speaks, routed by ALPN: ``http/1.1`` preferred, then ``h2``.

The router reads the ALPN protocols the client offers in its (plain-text) TLS ClientHello and, without decrypting:

* a client offering ``h2`` but not ``http/1.1`` (the SDK's gRPC channel) is piped, still encrypted, to the internal
  gRPC server, which terminates TLS itself (in C) with the same certificate and selects ``h2``;
* any other client (the SDK's token request through ``requests``, curl, browsers) is piped to an in-process TLS
  endpoint that selects ``http/1.1`` and serves the token endpoint and the control API through uvicorn's HTTP/1.1
  protocol, with the client's real address (the control API answers loopback peers only).

That is the same choice as a TLS server offering ``http/1.1`` first and ``h2`` second would make, but gRPC bytes are
never decrypted in Python: terminating TLS here cost about 1.4 ms per 40 KB page, more than the page itself.
Pipes use protocol callbacks with flow control (pause/resume reading when the other side's buffer fills).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
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
    """One side of a byte pipe; ``peer`` is the protocol of the other side."""

    def __init__(self, peer: "_Pipe | None" = None):
        self.peer = peer
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.peer.transport.write(data)

    def eof_received(self):
        other = self.peer.transport if self.peer is not None else None
        if other is not None and not other.is_closing() and other.can_write_eof():
            other.write_eof()
        return True

    def connection_lost(self, exc):
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    # The other side's buffer is full: stop reading here until it drains.
    def pause_writing(self):
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self):
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class _ClientSide(_Pipe):
    """An accepted client connection: reads the ClientHello, picks the route, then pipes."""

    def __init__(self, router: "AlpnRouter"):
        super().__init__()
        self.router = router
        self.hello = bytearray()
        self.routed = False

    def connection_made(self, transport):
        self.transport = transport
        self.router.connections.add(self)
        # A client that never completes its ClientHello must not hold a connection open forever.
        self.hello_timer = asyncio.get_running_loop().call_later(HELLO_TIMEOUT_S, self._hello_timeout)

    def _hello_timeout(self):
        if self.peer is None:
            self.transport.close()

    def data_received(self, data):
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)
            return
        self.hello += data
        if self.routed:
            return
        offered = offered_alpn(self.hello)
        if offered is None and len(self.hello) < _MAX_HELLO:
            return
        self.routed = True
        self.transport.pause_reading()
        to_grpc = "h2" in (offered or []) and "http/1.1" not in offered
        asyncio.get_running_loop().create_task(self._connect(to_grpc))

    async def _connect(self, to_grpc: bool):
        loop = asyncio.get_running_loop()
        upstream = _Pipe(self)
        try:
            if to_grpc:
                await loop.create_connection(lambda: upstream, "127.0.0.1", self.router.grpc_port)
            else:
                near, far = socket.socketpair()
                peer = self.transport.get_extra_info("peername")
                loop.create_task(self.router.serve_http(far, peer))
                await loop.create_connection(lambda: upstream, sock=near)
        except OSError as exc:
            log.warning("cannot reach the internal endpoint: %s", exc)
            self.transport.close()
            return
        if self.transport.is_closing():
            upstream.transport.close()
            return
        self.peer = upstream
        self.hello_timer.cancel()
        upstream.transport.write(bytes(self.hello))
        self.hello.clear()
        self.transport.resume_reading()

    def connection_lost(self, exc):
        self.hello_timer.cancel()
        self.router.connections.discard(self)
        super().connection_lost(exc)


class _PeerTransport:
    """The TLS transport as the HTTP protocol sees it, reporting the original client's address (the real
    connection behind it is a local socket pair)."""

    def __init__(self, transport: asyncio.Transport, peer):
        self._transport = transport
        self._peer = peer

    def get_extra_info(self, name, default=None):
        if name == "peername":
            return self._peer
        if name == "socket":
            return None
        return self._transport.get_extra_info(name, default)

    def __getattr__(self, name):
        return getattr(self._transport, name)


class _HttpsEndpoint(asyncio.Protocol):
    def __init__(self, router: "AlpnRouter", peer):
        self.router, self.peer = router, peer

    def connection_made(self, transport):
        http = self.router.http_protocol_factory()
        transport.set_protocol(http)
        http.connection_made(_PeerTransport(transport, self.peer))


class AlpnRouter:
    def __init__(self, http_ssl_context: ssl.SSLContext, grpc_port: int,
                 http_protocol_factory: Callable[[], asyncio.Protocol]):
        self.http_ssl_context = http_ssl_context
        self.grpc_port = grpc_port
        self.http_protocol_factory = http_protocol_factory
        self.connections: set[_ClientSide] = set()
        self.server: asyncio.AbstractServer | None = None

    async def bind(self, host: str, port: int) -> int:
        """Bind (raising OSError if the port is taken) without accepting yet; returns the bound port."""
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _ClientSide(self), host, port, start_serving=False,
                                               backlog=256)
        return self.server.sockets[0].getsockname()[1]

    async def serve(self) -> None:
        await self.server.start_serving()

    async def serve_http(self, sock: socket.socket, peer) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(lambda: _HttpsEndpoint(self, peer), sock, ssl=self.http_ssl_context,
                                               ssl_handshake_timeout=10)
        except (OSError, ssl.SSLError, asyncio.TimeoutError, ConnectionError) as exc:
            log.debug("TLS handshake failed: %s", exc)
            sock.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            conn.transport.close()
