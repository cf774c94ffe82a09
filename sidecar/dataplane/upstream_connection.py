"""One keep-alive HTTP/1.1 connection to the engine (an asyncio protocol whose responses httptools parses: uvicorn's
parser, already here for the server side) and the `Response` it reads, handed to the waiting relay as it comes.
The pool that opens, reuses and closes these connections is `upstream.py`."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import NamedTuple, Protocol

import httptools

from sidecar.dataplane.upstream_errors import BadAnswer, Disconnected, HeadTooLarge, UpstreamError, fresh

_COPY_BELOW = 64 * 1024  # a body this small goes out with the head in one write
_PAUSE_AT = 256 * 1024  # bytes read and not yet relayed: stop reading the engine until the relay catches up


class Origin(NamedTuple):
    """Where an engine is: the keep-alive pool's key, hashed in C on every request (a dataclass's hash is a Python
    call)."""

    scheme: str
    host: str
    port: int
    prefix: str  # the base URL's own path, before every request's
    host_header: bytes


class Pool(Protocol):
    """What a connection asks of the pool it belongs to."""

    max_head_bytes: int  # of a response's status line and headers: past it, `HeadTooLarge`

    def release(self, connection: Connection) -> None: ...

    def forget(self, connection: Connection) -> None: ...


class Response:
    """One answer from the engine: its head once `request` returns, its body read with `readany`/`read`."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._loop = connection.loop
        self.status = 0
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.keep_alive = False
        self.complete = False
        self.delimited = False  # by a length or chunks; else the body ends with the connection
        # Its result: None once the head is read, else the error that ended the exchange before it.
        self._head: asyncio.Future[UpstreamError | None] = self._loop.create_future()
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: UpstreamError | None = None
        self._reads_to: Callable[[bytes], bool] | None = None  # `hand_reads_to`

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

    async def read_head(self) -> Response:
        """This response once its head is read. One that fails before drops its connection."""
        try:
            failed = await self._head
            if failed is not None:
                raise fresh(failed)
        except BaseException:
            self._connection.finished(reusable=False)
            raise
        return self

    async def readany(self) -> bytes:
        """What has arrived since the last read (waiting for some), or b"" at the end of the body."""
        while not self._chunks:
            if self._error is not None:
                raise fresh(self._error)
            if self.complete:
                return b""
            self._waiter = self._loop.create_future()
            await self._waiter
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._taken()
        return data

    async def read(self, limit: int | None = None) -> bytes:
        """The body to its end, or its first `limit` bytes."""
        body = b"".join(await self.read_parts(limit))
        return body if limit is None else body[:limit]

    async def read_parts(self, limit: int | None = None) -> list[bytes]:
        """The body to its end, or to the read that takes it to `limit` bytes or past, as the engine's reads
        brought it: a large answer is never copied whole."""
        parts: list[bytes] = []
        size = 0
        while limit is None or size < limit:
            if not self._chunks:  # `readany`'s wait, without its joining what arrived meanwhile into one copy
                if self._error is not None:
                    raise fresh(self._error)
                if self.complete:
                    break
                self._waiter = self._loop.create_future()
                await self._waiter
                continue
            parts += self._chunks
            size += sum(map(len, self._chunks))
            self._taken()
        return parts

    def _taken(self) -> None:
        """What was buffered is the reader's: the connection reads again where a full buffer paused it."""
        self._chunks.clear()
        if self._buffered >= _PAUSE_AT:
            self._connection.resume()
        self._buffered = 0

    def hand_reads_to(self, handler: Callable[[bytes], bool] | None) -> None:
        """Each read that comes while `readany` waits with nothing buffered goes to `handler` first, in the engine
        connection's own callback: the relay writes its first token there, with no task woken. A read the handler
        does not take (it returns False) is buffered and wakes the reader as any other. None: every read buffered."""
        self._reads_to = handler

    def close(self) -> None:
        """The connection back to the pool after a whole answer; else dropped, which makes an engine abort."""
        self._connection.finished(reusable=self.complete and self.keep_alive and self._error is None)

    # -- from the connection ----------------------------------------------------------------------------------

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _feed(self, data: bytes) -> None:
        handler, waiter = self._reads_to, self._waiter
        # Only while the reader waits with nothing buffered: what it has yet to write goes out first.
        if handler is not None and not self._chunks and waiter is not None and not waiter.done() and handler(data):
            return
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


class Connection(asyncio.Protocol):
    def __init__(self, pool: Pool, origin: Origin) -> None:
        self.pool = pool
        self.origin = origin
        # Made in the loop (by create_connection's factory): asked for once here, not at each wait for a read, as
        # asyncio's get_running_loop() makes a getpid() system call every time it is asked.
        self.loop = asyncio.get_running_loop()
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
