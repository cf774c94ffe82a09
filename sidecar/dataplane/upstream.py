"""The proxy's HTTP/1.1 client to the engine: pooled keep-alive connections, each an asyncio protocol whose
responses httptools parses (uvicorn's parser, already here for the server side).

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
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools

from sidecar.dataplane.keepalive import KeepAlive
from sidecar.dataplane.upstream_errors import (
    BadAnswer,
    ConnectFailed,
    Disconnected,
    HeadTooLarge,
    OutOfDescriptors,
    UpstreamError,
    fresh,
)
from sidecar.http import tls_context

_COPY_BELOW = 64 * 1024  # a body this small goes out with the head in one write
_PAUSE_AT = 256 * 1024  # bytes read and not yet relayed: stop reading the engine until the relay catches up
# Out of descriptors, a new connection is tried again this often, for this long at most.
_DESCRIPTOR_POLL_S = 0.01
_DESCRIPTOR_WAIT_S = 1.0
# Parsed base URLs kept: a few engines at a time are in use; an origin is equal by value, so one parsed again
# still finds its idle connections.
_ORIGINS_KEPT = 64


@dataclass(frozen=True, slots=True)
class _Origin:
    scheme: str
    host: str
    port: int
    prefix: str  # the base URL's own path, before every request's
    host_header: bytes


class Response:
    """One answer from the engine: its head once `request` returns, its body read with `readany`/`read`."""

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection
        self.status = 0
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.keep_alive = False
        self.complete = False
        self.delimited = False  # by a length or chunks; else the body ends with the connection
        # Its result: None once the head is read, else the error that ended the exchange before it.
        self._head: asyncio.Future[UpstreamError | None] = asyncio.get_running_loop().create_future()
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: UpstreamError | None = None

    def header(self, name: str) -> str | None:
        """The first value of a header (name in lower case), or None."""
        wanted = name.encode("latin-1")
        for key, value in self.raw_headers:
            if key.lower() == wanted:
                return value.decode("latin-1")
        return None

    def headers(self) -> Iterable[tuple[str, str]]:
        return ((key.decode("latin-1"), value.decode("latin-1")) for key, value in self.raw_headers)

    @property
    def content_type(self) -> str:
        value = self.header("content-type")
        return value.split(";", 1)[0].strip().lower() if value else "application/octet-stream"

    @property
    def content_length(self) -> int | None:
        value = self.header("content-length")
        return int(value) if value is not None and value.strip().isdigit() else None

    async def readany(self) -> bytes:
        """What has arrived since the last read (waiting for some), or b"" at the end of the body."""
        while not self._chunks:
            if self._error is not None:
                raise fresh(self._error)
            if self.complete:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        if self._buffered >= _PAUSE_AT:
            self._connection.resume()
        self._buffered = 0
        return data

    async def read(self, limit: int | None = None) -> bytes:
        """The body to its end, or its first `limit` bytes."""
        parts: list[bytes] = []
        size = 0
        while limit is None or size < limit:
            data = await self.readany()
            if not data:
                break
            parts.append(data)
            size += len(data)
        body = b"".join(parts)
        return body if limit is None else body[:limit]

    def close(self) -> None:
        """The connection back to the pool after a whole answer; else dropped, which makes an engine abort."""
        self._connection.finished(reusable=self.complete and self.keep_alive and self._error is None)

    # -- from the connection ----------------------------------------------------------------------------------

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered >= _PAUSE_AT:
            self._connection.pause()
        self._wake()

    def _finish(self) -> None:
        self.complete = True
        self._wake()

    def _fail(self, error: UpstreamError) -> None:
        if self.complete:
            return
        self._error = error
        if not self._head.done():
            self._head.set_result(error)
        self._wake()


class _Connection(asyncio.Protocol):
    def __init__(self, pool: UpstreamPool, origin: _Origin) -> None:
        self.pool = pool
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: Response | None = None
        self.head_bytes = 0  # read of the response's head so far (informational heads before it included)
        self.informational = False  # in a 1xx head, which another head follows
        self.closed = False
        self.idle_since = 0.0

    # -- asyncio ------------------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.response is None:  # bytes nobody asked for: the connection cannot be trusted any more
            self.abort()
            return
        response = self.response
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            reason = exc.__context__ or exc  # what a callback raised says more than httptools' wrapper of it
            response._fail(BadAnswer(f"the engine's answer is not HTTP/1.1: {reason}"))
            self.abort()
            return
        if not response._head.done():  # all that was read is head: bounded as a client's head is
            self.head_bytes += len(data)
            if self.head_bytes > self.pool.max_head_bytes:
                response._fail(HeadTooLarge(f"the engine's headers are larger than {self.pool.max_head_bytes} bytes"))
                self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        response = self.response
        if response is None:
            self.pool.forget(self)
        elif not response.complete:
            if response._head.done() and not response.delimited:
                response._finish()  # a body without a length ends with the connection
            else:
                response._fail(Disconnected("the engine closed the connection"))
        # The parser calls this connection back, the transport and the response hold it: what it holds is let go,
        # so that a closed connection is freed at once, not left as a reference cycle for the garbage collector.
        self.transport = None
        self.response = None
        del self.parser

    # -- httptools ----------------------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.response is None or self.response.complete:  # an answer past the end of the one asked for
            raise ValueError("more than one answer to one request")

    def on_header(self, name: bytes, value: bytes | None) -> None:
        assert self.response is not None
        self.response.raw_headers.append((name, value or b""))

    def on_headers_complete(self) -> None:
        response = self.response
        assert response is not None
        status = self.parser.get_status_code()
        if status < 200:  # 100 Continue, 103 Early Hints: informational, the answer's own head follows
            response.raw_headers.clear()
            self.informational = True
            return
        if status > 599:  # httptools reads any three digits
            raise ValueError(f"status {status}")
        response.status = status
        response.keep_alive = self.parser.should_keep_alive()
        response.delimited = any(
            name.lower() in (b"content-length", b"transfer-encoding") for name, _ in response.raw_headers
        )
        if not response._head.done():
            response._head.set_result(None)

    def on_body(self, body: bytes) -> None:
        assert self.response is not None
        self.response._feed(body)

    def on_message_complete(self) -> None:
        assert self.response is not None
        if self.informational:  # the end of an informational head, not of the answer
            self.informational = False
            return
        self.response._finish()

    # -- the pool's and the response's ---------------------------------------------------------------------------

    def send(self, head: bytes, body: bytes) -> Response:
        assert self.transport is not None
        self.response = Response(self)
        self.head_bytes, self.informational = 0, False
        if len(body) < _COPY_BELOW:
            self.transport.write(head + body)
        else:  # a large prompt is not copied once more
            self.transport.write(head)
            self.transport.write(body)
        return self.response

    def finished(self, reusable: bool) -> None:
        self.response = None
        if reusable and not self.closed:
            self.pool.release(self)
        else:
            self.abort()

    def pause(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


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
        self._origins: dict[str, _Origin] = {}
        self.idle: KeepAlive[_Origin, _Connection] = KeepAlive(keepalive_s)
        self._tls = tls

    async def request(
        self, method: str, base_url: str, target: str, headers: Iterable[tuple[str, str]], body: bytes
    ) -> Response:
        """Send one request; the engine's response head."""
        return await self.send(method, base_url, target, headers, body).response()

    def send(self, method: str, base_url: str, target: str, headers: Iterable[tuple[str, str]], body: bytes) -> Sending:
        """Write one request now where a connection to the engine is idle (else it goes once `response` has one),
        so that the caller can do what can wait while the engine works on it."""
        try:
            origin = self._origin(base_url)
        except ConnectFailed as exc:
            return Sending(self, None, b"", body, failed=exc)
        lines = [f"{method} {origin.prefix}{target} HTTP/1.1\r\n".encode("latin-1"), origin.host_header]
        lines += [f"{name}: {value}\r\n".encode("latin-1") for name, value in headers]
        if body or method in ("POST", "PUT", "PATCH"):
            lines.append(b"content-length: %d\r\n" % len(body))
        return Sending(self, origin, b"".join(lines) + b"\r\n", body)

    def release(self, connection: _Connection) -> None:
        self.idle.put(connection.origin, connection)

    def forget(self, connection: _Connection) -> None:
        """An idle connection the engine closed."""
        self.idle.forget(connection.origin, connection)

    def close(self) -> None:
        self.idle.close()

    async def _connect(self, origin: _Origin) -> _Connection:
        """A new connection. Without a descriptor for it, it waits a moment for one (connections being closed free
        theirs: a burst's refused clients, idle ones timing out) rather than failing the request at once."""
        loop = asyncio.get_running_loop()
        tls = self._tls_context() if origin.scheme == "https" else None
        waited_until = loop.time() + min(_DESCRIPTOR_WAIT_S, self.connect_timeout_s)
        while True:
            try:
                async with asyncio.timeout(self.connect_timeout_s):
                    _, connection = await loop.create_connection(
                        lambda: _Connection(self, origin),
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

    def _origin(self, base_url: str) -> _Origin:
        origin = self._origins.get(base_url)
        if origin is None:
            if len(self._origins) >= _ORIGINS_KEPT:  # each engine start is a new port: parsed again if in use
                self._origins.clear()
            parts = urlsplit(base_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConnectFailed(f"not an http(s) URL: {base_url!r}")
            port = parts.port or (443 if parts.scheme == "https" else 80)
            host_header = f"host: {parts.netloc.rsplit('@', 1)[-1]}\r\n".encode("latin-1")
            origin = _Origin(parts.scheme, parts.hostname, port, parts.path.rstrip("/"), host_header)
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
        self, pool: UpstreamPool, origin: _Origin | None, head: bytes, body: bytes, failed: UpstreamError | None = None
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
                return await _head(written)
            except Disconnected:
                pass
        connection = await self._pool._connect(self._origin)
        return await _head(connection.send(self._request_head, self._body))

    def close(self) -> None:
        """Where `response` will not be awaited: the connection the request went out on is dropped."""
        if self._written is not None:
            self._written.close()
            self._written = None


async def _head(response: Response) -> Response:
    try:
        failed = await response._head
        if failed is not None:
            raise fresh(failed)
    except BaseException:
        response._connection.finished(reusable=False)
        raise
    return response
