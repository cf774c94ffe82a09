"""The proxy's HTTP/1.1 client to the engine: pooled keep-alive connections (`upstream_connection.py`: each an
asyncio protocol whose responses httptools parses).

Not a general client such as aiohttp's, which takes a quarter of the sidecar's CPU under load (cProfile at 64
streams: its request objects, header multidicts and timers per request, its stream reader's wake-up and
flow-control calls per read): this one writes a request in one `write`, and hands a read to the waiting relay
as it comes.
It does only what the proxy needs: one request at a time per connection, bodies known whole, responses
delimited by length, chunks or the connection's end, TLS verified against the system's CAs for `https`.
"""

from __future__ import annotations

import asyncio
import errno
import ssl
from collections.abc import Iterable
from urllib.parse import urlsplit

from sidecar.dataplane.keepalive import KeepAlive
from sidecar.dataplane.upstream_connection import Connection, Origin, Response
from sidecar.dataplane.upstream_errors import ConnectFailed, Disconnected, OutOfDescriptors, UpstreamError, fresh
from sidecar.http import tls_context

__all__ = ["Response", "Sending", "UpstreamPool"]

# Out of descriptors, a new connection is tried again this often, for this long at most.
_DESCRIPTOR_POLL_S = 0.01
_DESCRIPTOR_WAIT_S = 1.0
# Parsed base URLs kept: a few engines at a time are in use; an origin is equal by value, so one parsed again
# still finds its idle connections.
_ORIGINS_KEPT = 64


# A request's headers as they go on the wire: the client's are bytes already, never decoded to be encoded again.
WireHeaders = Iterable[tuple[bytes, bytes]]


class UpstreamPool:
    """Keep-alive connections per engine origin, the most recently used first; no cap (the engine's queue is the
    cap). Idle ones are closed `keepalive_s` after their last use (`KeepAlive`), before the engine would close them
    itself (uvicorn, so vLLM and SGLang, closes after 5 s): reusing one it is closing loses the request."""

    def __init__(
        self,
        connect_timeout_s: float,
        keepalive_s: float,
        tls: ssl.SSLContext | None = None,
        max_head_bytes: int = 64 * 1024,
    ) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.max_head_bytes = max_head_bytes  # of a response's status line and headers: past it, `HeadTooLarge`
        self._origins: dict[str, Origin] = {}
        self.idle: KeepAlive[Origin, Connection] = KeepAlive(keepalive_s)
        self._tls = tls

    async def request(self, method: str, base_url: str, target: str, headers: WireHeaders, body: bytes) -> Response:
        """Send one request; the engine's response head."""
        return await self.send(method, base_url, target, headers, body).response()

    def send(self, method: str, base_url: str, target: str, headers: WireHeaders, body: bytes) -> Sending:
        """Write one request now where a connection to the engine is idle (else it goes once `response` has one),
        so that the caller can do what can wait while the engine works on it."""
        try:
            origin = self._origin(base_url)
        except ConnectFailed as exc:
            return Sending(self, None, b"", body, failed=exc)
        lines = [f"{method} {origin.prefix}{target} HTTP/1.1\r\n".encode("latin-1"), origin.host_header]
        lines += [b"%s: %s\r\n" % header for header in headers]
        if body or method in ("POST", "PUT", "PATCH"):
            lines.append(b"content-length: %d\r\n" % len(body))
        return Sending(self, origin, b"".join(lines) + b"\r\n", body)

    def release(self, connection: Connection) -> None:
        self.idle.put(connection.origin, connection)

    def forget(self, connection: Connection) -> None:
        """An idle connection the engine closed."""
        self.idle.forget(connection.origin, connection)

    def close(self) -> None:
        self.idle.close()

    async def _connect(self, origin: Origin) -> Connection:
        """A new connection. Without a descriptor for it, it waits a moment for one (connections being closed free
        theirs: a burst's refused clients, idle ones timing out) rather than failing the request at once."""
        loop = asyncio.get_running_loop()
        tls = self._tls_context() if origin.scheme == "https" else None
        waited_until = loop.time() + min(_DESCRIPTOR_WAIT_S, self.connect_timeout_s)
        while True:
            try:
                async with asyncio.timeout(self.connect_timeout_s):
                    _, connection = await loop.create_connection(
                        lambda: Connection(self, origin),
                        origin.host,
                        origin.port,
                        ssl=tls,
                        server_hostname=origin.host if tls else None,
                    )
                return connection
            except ssl.SSLError as exc:
                raise ConnectFailed(f"TLS with the engine failed: {exc.reason or exc}") from None
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE):
                    raise ConnectFailed(exc.strerror or str(exc)) from None
                if loop.time() >= waited_until:
                    raise OutOfDescriptors(exc.strerror) from None
            await asyncio.sleep(_DESCRIPTOR_POLL_S)

    def _origin(self, base_url: str) -> Origin:
        origin = self._origins.get(base_url)
        if origin is None:
            if len(self._origins) >= _ORIGINS_KEPT:  # each engine start is a new port: parsed again if in use
                self._origins.clear()
            parts = urlsplit(base_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConnectFailed(f"not an http(s) URL: {base_url!r}")
            port = parts.port or (443 if parts.scheme == "https" else 80)
            host_header = f"host: {parts.netloc.rsplit('@', 1)[-1]}\r\n".encode("latin-1")
            origin = Origin(parts.scheme, parts.hostname, port, parts.path.rstrip("/"), host_header)
            self._origins[base_url] = origin
        return origin

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = tls_context()
        return self._tls


class Sending:
    """A request on its way: written on a pooled connection as it was made, or waiting for `response` to open one.
    `response` must be awaited (it is the request's only end), or `close` called. One that could not be made (not
    an http(s) URL) raises its error there, with the others."""

    def __init__(
        self, pool: UpstreamPool, origin: Origin | None, head: bytes, body: bytes, failed: UpstreamError | None = None
    ) -> None:
        self._pool, self._origin, self._request_head, self._body, self._failed = pool, origin, head, body, failed
        connection = pool.idle.take(origin) if origin is not None else None
        self._written = connection.send(head, body) if connection is not None else None

    async def response(self) -> Response:
        """The engine's response head. A pooled connection the engine closed as it was reused (before its answer
        began: llama-server's HTTP threads do this) costs one more try, on a new one."""
        if self._failed is not None:
            raise fresh(self._failed)
        assert self._origin is not None
        written, self._written = self._written, None
        if written is not None:
            try:
                return await written.read_head()
            except Disconnected:
                pass
        connection = await self._pool._connect(self._origin)
        return await connection.send(self._request_head, self._body).read_head()

    def close(self) -> None:
        """Where `response` will not be awaited: the connection the request went out on is dropped."""
        if self._written is not None:
            self._written.close()
            self._written = None
