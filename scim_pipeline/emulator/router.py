"""One TLS port for everything the SDK speaks, routed by the ALPN protocol negotiated in the handshake.

``h2`` connections (the SDK's gRPC channel) are piped, decrypted, to the internal plain-text gRPC server on a
loopback port. ``http/1.1`` connections (the SDK's token request via ``requests``, and the control API) are handed
to uvicorn's HTTP/1.1 protocol on the same transport, in this process, so the ASGI app sees the real peer address.
Both pipes use protocol callbacks with flow control, not streams: this is on the hot path of every gRPC byte.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Callable

log = logging.getLogger(__name__)


class _Upstream(asyncio.Protocol):
    """The loopback connection to the gRPC server, feeding one client connection."""

    def __init__(self, client: "_TlsConnection"):
        self.client = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.client.transport.write(data)

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        self.client.transport.close()

    # The client's TLS transport has a full buffer: stop reading from the gRPC server until it drains.
    def pause_writing(self):
        self.client.transport.pause_reading()

    def resume_writing(self):
        self.client.transport.resume_reading()


class _TlsConnection(asyncio.Protocol):
    def __init__(self, router: "AlpnRouter"):
        self.router = router
        self.transport: asyncio.Transport | None = None
        self.upstream: _Upstream | None = None
        self.pending: list[bytes] = []
        self.closed = False

    def connection_made(self, transport):
        self.transport = transport
        ssl_object: ssl.SSLObject | None = transport.get_extra_info("ssl_object")
        protocol = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        if protocol == "h2":
            self.router.connections.add(self)
            transport.pause_reading()
            asyncio.get_running_loop().create_task(self._connect_upstream())
        else:
            # No ALPN at all is HTTP/1.1 too (curl --no-alpn, old clients).
            http = self.router.http_protocol_factory()
            transport.set_protocol(http)
            http.connection_made(transport)

    async def _connect_upstream(self):
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await loop.create_connection(lambda: _Upstream(self), "127.0.0.1", self.router.grpc_port)
        except OSError as exc:
            log.warning("cannot reach the internal gRPC server: %s", exc)
            self.transport.close()
            return
        if self.closed:
            upstream.transport.close()
            return
        self.upstream = upstream
        for chunk in self.pending:
            upstream.transport.write(chunk)
        self.pending.clear()
        self.transport.resume_reading()

    def data_received(self, data):
        if self.upstream is not None:
            self.upstream.transport.write(data)
        else:
            self.pending.append(data)

    def eof_received(self):
        if self.upstream is not None and self.upstream.transport.can_write_eof():
            self.upstream.transport.write_eof()
        return False

    def connection_lost(self, exc):
        self.closed = True
        self.router.connections.discard(self)
        if self.upstream is not None:
            self.upstream.transport.close()

    # The gRPC server's socket is full: stop reading from the client until it drains.
    def pause_writing(self):
        if self.upstream is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self):
        if self.upstream is not None:
            self.upstream.transport.resume_reading()


class AlpnRouter:
    def __init__(self, ssl_context: ssl.SSLContext, grpc_port: int,
                 http_protocol_factory: Callable[[], asyncio.Protocol]):
        self.ssl_context = ssl_context
        self.grpc_port = grpc_port
        self.http_protocol_factory = http_protocol_factory
        self.connections: set[_TlsConnection] = set()
        self.server: asyncio.AbstractServer | None = None

    async def bind(self, host: str, port: int) -> int:
        """Bind (raising OSError if the port is taken) without accepting yet; returns the bound port."""
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _TlsConnection(self), host, port, ssl=self.ssl_context,
                                               start_serving=False, backlog=256, ssl_handshake_timeout=10)
        return self.server.sockets[0].getsockname()[1]

    async def serve(self) -> None:
        await self.server.start_serving()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            conn.transport.close()
        if self.server is not None:
            try:
                await asyncio.wait_for(self.server.wait_closed(), 2)
            except asyncio.TimeoutError:
                pass
