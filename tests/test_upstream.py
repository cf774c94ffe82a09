"""The proxy's client to the engine, against raw HTTP servers on loopback that answer as engines may."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from sidecar.dataplane.upstream import UpstreamPool
from sidecar.dataplane.upstream_errors import BadAnswer, ConnectFailed, Disconnected
from tests.processes import until

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def server(handler: Handler) -> AsyncIterator[tuple[str, list[int]]]:
    """A server on a free port: its URL, and a list that gets one entry per connection it accepted."""
    connections: list[int] = []

    async def counted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            await handler(reader, writer)
        finally:
            writer.close()

    listening = await asyncio.start_server(counted, "127.0.0.1", 0)
    port = listening.sockets[0].getsockname()[1]
    async with listening:
        yield f"http://127.0.0.1:{port}", connections


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request's head and body; b"" when the client closed."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    return head + await reader.readexactly(length)


async def body_of(pool: UpstreamPool, url: str, method: str = "GET", body: bytes = b"") -> bytes:
    """One whole exchange, as the proxy has it: the request, the answer's body, the connection given back."""
    response = await pool.request(method, url, "/", [], body)
    try:
        return await response.read()
    finally:
        response.close()


async def keep_answering(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        try:
            request = await read_request(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        body = request.split(b"\r\n\r\n", 1)[1]
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()


async def test_connections_are_kept_alive_and_reused_until_the_keepalive_ends() -> None:
    pool = UpstreamPool(connect_timeout_s=5, keepalive_s=0.2)
    async with server(keep_answering) as (url, connections):
        for body in (b"one", b"two"):
            response = await pool.request("POST", url, "/echo", [(b"content-type", b"text/plain")], body)
            assert (response.status, response.content_type, await response.read()) == (200, "text/plain", body)
            response.close()
        assert len(connections) == 1
        await asyncio.sleep(0.3)  # past the keep-alive: the idle connection is not trusted any more
        assert await body_of(pool, url, "POST", b"three") == b"three"
        assert len(connections) == 2
    pool.close()


async def test_idle_connections_are_closed_at_their_keepalive_with_no_request_after_them() -> None:
    """The engine sees each idle connection closed `keepalive_s` after its last use, though no request came to look
    for one (a quiet sidecar holds no connection to the engine, whose own timer a busy loop may run late); one that
    went idle later is closed at its own time, not with the first."""
    loop = asyncio.get_running_loop()
    closed_at: list[float] = []

    async def answering_then_noting_the_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await keep_answering(reader, writer)
        closed_at.append(loop.time())

    keepalive_s = 0.3
    pool = UpstreamPool(connect_timeout_s=5, keepalive_s=keepalive_s)
    async with server(answering_then_noting_the_close) as (url, connections):
        first = await pool.request("POST", url, "/", [], b"first")
        second = await pool.request("POST", url, "/", [], b"second")  # the first's connection is busy: a new one
        assert len(connections) == 2
        idle_since = []
        for response in (first, second):
            await response.read()
            response.close()
            idle_since.append(loop.time())
            await asyncio.sleep(0.15)
        deadline = loop.time() + 5
        while len(closed_at) < 2 and loop.time() < deadline:
            await asyncio.sleep(0.01)
        assert len(closed_at) == 2 and len(pool.idle) == 0
        for went_idle, closed in zip(idle_since, closed_at, strict=True):
            assert keepalive_s - 0.01 <= closed - went_idle < keepalive_s + 2, (idle_since, closed_at)
    pool.close()


async def test_a_pool_keeps_nothing_for_engines_long_gone_however_many_came_and_went() -> None:
    """Each engine start is a new origin (a new port): a sidecar that swaps models for months must not keep a parsed
    origin and an idle list for every one it ever used (the timer walks each list; every engine's is dropped once
    it has no connection left, and parsed origins are a bounded cache)."""
    pool = UpstreamPool(connect_timeout_s=5, keepalive_s=0.05)
    for _ in range(150):
        async with server(keep_answering) as (url, _):
            assert await body_of(pool, url, "POST", b"x") == b"x"
    await until(lambda: not pool.idle._idle)  # every connection closed at its keep-alive, every list dropped
    assert len(pool._origins) <= 64
    async with server(keep_answering) as (url, connections):  # and the pool still serves, and keeps alive
        assert [await body_of(pool, url, "POST", body) for body in (b"a", b"b")] == [b"a", b"b"]
        assert len(connections) == 1
    pool.close()


async def test_a_body_without_a_length_ends_with_the_connection_which_is_not_reused() -> None:
    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of ")
        await writer.drain()
        writer.write(b"it")

    pool = UpstreamPool(connect_timeout_s=5, keepalive_s=5)
    async with server(until_close) as (url, connections):
        for _ in range(2):
            assert await body_of(pool, url) == b"all of it"
        assert len(connections) == 2


async def test_a_large_chunked_body_read_slowly_arrives_whole_and_in_order() -> None:
    """More than the reading pause holds: the connection stops reading while the reader lags, and resumes."""
    parts = [bytes([65 + i % 26]) * 50_000 for i in range(40)]  # 2 MB

    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for part in parts:
            writer.write(b"%x\r\n%s\r\n" % (len(part), part))
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        await reader.read()  # until the client closes

    pool = UpstreamPool(connect_timeout_s=5, keepalive_s=5)
    async with server(chunked) as (url, _):
        response = await pool.request("POST", url, "/v1/chat/completions", [], b"{}")
        received = bytearray()
        while data := await response.readany():
            received += data
            await asyncio.sleep(0.001)
        assert received == b"".join(parts)
        response.close()
    pool.close()


async def test_what_is_not_http_is_a_bad_answer_and_a_connection_closed_mid_body_a_disconnect() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        await writer.drain()

    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part")
        await writer.drain()

    pool = UpstreamPool(connect_timeout_s=5, keepalive_s=5)
    async with server(garbage) as (url, _):
        with pytest.raises(BadAnswer):
            await pool.request("GET", url, "/", [], b"")
    async with server(cut) as (url, _):
        with pytest.raises(Disconnected):
            await body_of(pool, url)


async def test_a_pooled_connection_closed_by_the_engine_is_retried_once_on_a_new_one() -> None:
    async def one_answer_then_close_on_the_next(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        await read_request(reader)  # the next request on this connection: closed unanswered

    pool = UpstreamPool(connect_timeout_s=5, keepalive_s=5)
    async with server(one_answer_then_close_on_the_next) as (url, connections):
        for _ in range(3):
            assert await body_of(pool, url) == b"ok"
        assert len(connections) == 3
    pool.close()


async def test_nothing_listening_is_a_connect_failure() -> None:
    async with server(keep_answering) as (url, _):
        pass  # closed again: its port refuses now
    with pytest.raises(ConnectFailed):
        await UpstreamPool(connect_timeout_s=5, keepalive_s=5).request("GET", url, "/", [], b"")


async def test_a_request_on_an_idle_connection_is_written_before_its_answer_is_awaited() -> None:
    """The proxy sets up its bookkeeping while the engine already works on the request; a request it then gives
    up before awaiting the answer drops its connection, as an abandoned answer does (the engine aborts)."""
    received: asyncio.Queue[bytes] = asyncio.Queue()
    closed = asyncio.Event()

    async def recording(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                request = await read_request(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                closed.set()
                return
            await received.put(request)
            if not request.endswith(b"slow"):  # an engine still working on it
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()

    pool = UpstreamPool(connect_timeout_s=5, keepalive_s=5)
    async with server(recording) as (url, connections):
        assert await body_of(pool, url) == b"ok"  # a connection in the pool
        await received.get()
        sending = pool.send("POST", url, "/v1/chat/completions", [], b'{"first": true}')
        request = await asyncio.wait_for(received.get(), timeout=5)  # here before anyone awaits the answer
        assert request.endswith(b'{"first": true}')
        response = await sending.response()
        assert (response.status, await response.read()) == (200, b"ok")
        response.close()

        abandoned = pool.send("POST", url, "/v1/chat/completions", [], b"slow")
        await asyncio.wait_for(received.get(), timeout=5)
        abandoned.close()
        await asyncio.wait_for(closed.wait(), timeout=5)
        assert len(connections) == 1
    pool.close()


async def test_a_request_to_what_is_not_an_http_url_fails_when_its_answer_is_awaited() -> None:
    sending = UpstreamPool(connect_timeout_s=5, keepalive_s=5).send("GET", "unix:/engine.sock", "/", [], b"")
    with pytest.raises(ConnectFailed, match="not an http"):
        await sending.response()


async def test_informational_heads_are_skipped_and_the_answers_own_head_is_the_response() -> None:
    async def continue_then_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </style.css>\r\n\r\n")
        await writer.drain()
        writer.write(b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        await keep_answering(reader, writer)

    pool = UpstreamPool(connect_timeout_s=5, keepalive_s=5)
    async with server(continue_then_answer) as (url, connections):
        response = await pool.request("POST", url, "/", [], b"{}")
        assert (response.status, response.raw_headers) == (201, [(b"content-length", b"2")])
        assert await response.read() == b"ok"
        response.close()
        assert await body_of(pool, url, "POST", b"again") == b"again"  # the connection is whole: reused
        assert len(connections) == 1
    pool.close()


async def test_a_status_http_does_not_have_is_a_bad_answer_not_tried_again() -> None:
    answers = [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", b"HTTP/1.1 999 Odd\r\ncontent-length: 0\r\n\r\n"]

    async def ok_then_odd(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for answer in answers:
            await read_request(reader)
            writer.write(answer)
            await writer.drain()
        await reader.read()

    pool = UpstreamPool(connect_timeout_s=5, keepalive_s=5)
    async with server(ok_then_odd) as (url, connections):
        assert await body_of(pool, url) == b"ok"
        with pytest.raises(BadAnswer, match="status 999"):
            await pool.request("GET", url, "/", [], b"")  # on the pooled connection: the engine did answer
        assert len(connections) == 1
    pool.close()


async def test_bytes_past_the_end_of_an_answer_are_not_taken_for_the_next_request() -> None:
    """An engine that writes a second answer after the one asked for: the first is whole, the rest is no one's, and
    the connection is dropped rather than pooled with half an answer in its parser."""

    async def answer_twice(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nsmuggl"
        )
        await writer.drain()
        await keep_answering(reader, writer)

    pool = UpstreamPool(connect_timeout_s=5, keepalive_s=5)
    async with server(answer_twice) as (url, connections):
        assert await body_of(pool, url) == b"ok"
        assert await body_of(pool, url, "POST", b"next") == b"ok"  # on a new connection
        assert len(connections) == 2
    pool.close()
