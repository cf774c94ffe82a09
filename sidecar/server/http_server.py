"""The sidecar's HTTP/1.1 server protocol: uvicorn's on httptools, with bounds on what a client may hold, and the
errors it makes itself in the OpenAI shape.

httptools (llhttp) bounds neither the request line nor the headers, and uvicorn adds no bound of its own for
it: one client sending a single 200 MB header had the sidecar keep all of it (RSS up 300 MB) and spend a
minute of its event loop growing the value piece by piece (httptools appends each read to the bytes so far,
so the copying is quadratic), every stream stalled meanwhile. Nor does uvicorn time out a connection that
sends nothing, half a head, or half a body, or that stops reading its answer: each holds a descriptor (and a
stream its engine request) for as long as its client likes. As nginx does (`client_header_timeout`,
`client_body_timeout`, `send_timeout`, `large_client_header_buffers`; vLLM bounds heads since
GHSA-rxc4-3w6r-4v47):
- a head (request line and headers) past `SIDECAR_MAX_HEADER_BYTES` is answered 431;
- a head not complete `SIDECAR_CLIENT_TIMEOUT_S` after it began (a new connection's, after it opened), or a
  body with no read for as long, is answered 408;
- a client that leaves the answer unread as long, its buffer full, is cut off with a reset, which drops what
  the kernel still held for it (the relay then sees a client gone, which cancels the engine's request);
- a request on a connection past what the open-files limit can serve (`resources`) is answered 503;
- and the connection is closed after any of these. A connection idle between requests is uvicorn's
  keep-alive timeout's; an answer going out to a client that reads it is never cut, however long it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import time
from http import HTTPStatus
from typing import Any, ClassVar, cast

from starlette.types import Scope
from uvicorn._types import HTTPScope
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from sidecar import request_state
from sidecar.errors import BadRequest, RequestHeadersTooLarge, RequestTimeout, SidecarError, SidecarOverloaded
from sidecar.logs import Throttle, get_logger
from sidecar.telemetry import resources

log = get_logger("sidecar.http")

_LINGER_OFF = struct.pack("ii", 1, 0)  # SO_LINGER on, for 0 s: a close resets the connection

_REFUSALS = Throttle(5.0)  # connections refused at the open-files limit: a storm of them is one line every 5 s
# Clients cut off for their slowness, by what they were slow at: a slowloris of thousands is a line every 5 s.
_TIMEOUTS = {waiting_for: Throttle(5.0) for waiting_for in ("head", "body", "reads")}


def _log_client_timeout(waiting_for: str, **fields: Any) -> None:
    if timed_out := _TIMEOUTS[waiting_for].due():
        log.warning("client_timeout", waiting_for=waiting_for, timed_out=timed_out, **fields)


def _state(scope: HTTPScope) -> request_state.RequestState:
    return request_state.of(cast(Scope, scope))  # uvicorn types its scope as a TypedDict: the same dict


class _HeadTooLarge(Exception):
    """Raised in the parser's callback: httptools stops there and uvicorn answers through `send_400_response`."""


class HttpProtocol(HttpToolsProtocol):
    max_head_bytes: ClassVar[int] = 64 * 1024
    client_timeout_s: ClassVar[float] = 60.0
    max_connections: ClassVar[int] = 1 << 30
    served: ClassVar[int] = 0  # connections this process serves: counted at their first request, not when accepted

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # from the end of a request's body (or the connection's start) to the next headers
        self._head_bytes = 0  # bytes read meanwhile: the head, and at most a read's worth of what came around it
        self._head_began: float | None = None  # loop time of the head's first byte (a new connection: its start)
        self._body_read = 0.0  # loop time of the body's latest read
        self._timer: asyncio.TimerHandle | None = None  # set only while a head or a body is incomplete
        self._write_timer: asyncio.TimerHandle | None = None  # set only while the client's buffer is full
        self._refusal: SidecarError | None = None  # what `send_400_response` answers instead of invalid HTTP
        self._served = False  # counted among the connections served (`max_connections`)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_began = self.loop.time()
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._served:
            HttpProtocol.served -= 1
        for timer in (self._timer, self._write_timer):
            if timer is not None:
                timer.cancel()
        self._timer = self._write_timer = None
        super().connection_lost(exc)
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            _state(cycle.scope).connection_lost()

    def pause_writing(self) -> None:
        super().pause_writing()
        self._note_writes(paused=True)
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.client_timeout_s, self._client_not_reading)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._note_writes(paused=False)
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def data_received(self, data: bytes) -> None:
        now = self.loop.time()
        if self._in_head:
            if self._head_began is None:
                self._head_began = now
            self._head_bytes += len(data)
        super().data_received(data)
        if self.transport.is_closing():
            return
        if self._in_head:
            if self._head_bytes > self.max_head_bytes:  # refused before a byte more of it is kept
                self._refuse_head()
                self.send_400_response("")
            elif self._head_bytes and self._timer is None:  # a head split over reads: it gets the time it may take
                self._arm()
        else:  # the body is coming
            self._body_read = now
            if self._timer is None:
                self._arm()

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self.transport.is_closing():  # refused (below) earlier in this read: what follows it is not served
            return
        # The reads' sizes count a body's first bytes too: only past the limit is the head itself measured.
        if self._head_bytes > self.max_head_bytes and self._head_size() > self.max_head_bytes:
            self._refuse_head()
            raise _HeadTooLarge
        if not self._served and not self._serve():
            # Served, it would take the descriptor another request needs for the engine; answered, its own is freed.
            if refused := _REFUSALS.due():
                log.warning("connections_over_limit", open_files_limit=resources.open_files_limit(), refused=refused)
            self._answer(SidecarOverloaded("as many connections as the open-files limit allows are served: retry"))
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self.cycle is not None:  # None: the connection's first request was refused, and nothing reads its body
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self.cycle is None:
            return
        super().on_message_complete()
        self._in_head = True
        self._head_bytes = 0
        self._head_began = None

    def _unsupported_upgrade_warning(self) -> None:
        """A request asking to switch protocols (a WebSocket's, or `curl --http2`'s h2c): the sidecar serves none
        (uvicorn's `ws="none"`), so it is answered as the HTTP request it also is, key checked, with an OpenAI error
        where it earns one. The parser ends such a request at its head (a body sent with it is never read as its
        body), so the connection is closed once the answer is out rather than left with what followed. (uvicorn
        logs two warnings here, advising to install a WebSocket library.)"""
        if self.cycle is not None:
            self.cycle.keep_alive = False

    def send_400_response(self, msg: str) -> None:
        """What uvicorn answers to what is not HTTP/1.1 (its text/plain 400), or the refusal decided here, as an
        OpenAI error; the connection closed after it."""
        self._answer(self._refusal or BadRequest("invalid HTTP/1.1 request", code="invalid_http"))

    # -- the bounds --------------------------------------------------------------------------------------------

    def _serve(self) -> bool:
        """Whether this connection may be served. Counted at its first request: every connection a burst brings is
        accepted before any request is read, and the first of them are the ones to serve."""
        if HttpProtocol.served >= self.max_connections:
            return False
        HttpProtocol.served += 1
        self._served = True
        return True

    def _head_size(self) -> int:
        return len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)

    def _refuse_head(self) -> None:
        limit = self.max_head_bytes
        self._refusal = RequestHeadersTooLarge(f"request line and headers larger than {limit} bytes")
        log.warning("request_head_too_large", limit_bytes=limit)

    def _arm(self) -> None:
        self._timer = self.loop.call_later(self.client_timeout_s, self._check_client)

    def _check_client(self) -> None:
        """The timer: the client has run out of time, or the timer is set again for when it will, or (between
        requests, or once a response goes out) it is not needed."""
        self._timer = None
        if self.transport.is_closing():
            return
        responding = self.cycle is not None and not self.cycle.response_complete
        if self._in_head:
            if self._head_began is None or responding:
                return  # idle between requests (uvicorn's keep-alive timeout), or the next head waits its turn
            due = self._head_began + self.client_timeout_s
        else:
            due = self._body_read + self.client_timeout_s
        now = self.loop.time()
        if now < due:
            self._timer = self.loop.call_later(due - now, self._check_client)
            return
        timeout = self.client_timeout_s
        if self._in_head:
            _log_client_timeout(waiting_for="head", timeout_s=timeout, bytes_read=self._head_bytes)
            if self._head_bytes:
                self._answer(RequestTimeout(f"the request's head was not complete within {timeout:g} s"))
            else:  # a connection that never sent a byte
                self.transport.close()
            return
        state = _state(self.cycle.scope)
        state.client_timed_out = True
        _log_client_timeout(waiting_for="body", timeout_s=timeout, request_id=state.request_id)
        if self.cycle.response_started:
            self.transport.close()
        else:  # the app is still reading the body: it sees the client gone
            self._answer(RequestTimeout(f"no part of the request's body came for {timeout:g} s"))

    def _client_not_reading(self) -> None:
        """The write timer: the client has left a full buffer unread for the client timeout."""
        self._write_timer = None
        if self.transport.is_closing():
            return
        state = _state(self.cycle.scope) if self.cycle is not None else request_state.RequestState()
        state.client_timed_out = True
        request_id = state.request_id
        _log_client_timeout(waiting_for="reads", timeout_s=self.client_timeout_s, request_id=request_id)
        _reset(self.transport)  # what it did not read is dropped; the app's request sees its client gone

    def _note_writes(self, paused: bool) -> None:
        if self.cycle is not None and not self.cycle.response_complete:
            _state(self.cycle.scope).client_writes = (paused, time.perf_counter())

    def _answer(self, error: SidecarError) -> None:
        body = json.dumps(error.body()).encode()
        content = [b"HTTP/1.1 %d %s\r\n" % (error.status_code, HTTPStatus(error.status_code).phrase.encode())]
        for name, value in self.server_state.default_headers:
            content += [name, b": ", value, b"\r\n"]
        for name_str, value_str in error.headers.items():
            content.append(f"{name_str.lower()}: {value_str}\r\n".encode("latin-1"))
        content.append(b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body))
        content.append(b"connection: close\r\n\r\n" + body)
        self.transport.write(b"".join(content))
        self.transport.close()


def _reset(transport: asyncio.Transport) -> None:
    """The connection closed with a reset (nginx's `reset_timedout_connection`): the kernel drops what its send
    buffer still holds for the client, megabytes of an answer it did not read, and frees the socket at once, rather
    than trickling it out to a client that reads at its own pace long after the sidecar let it go."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_OFF)
    transport.abort()


def protocol(max_head_bytes: int, client_timeout_s: float) -> type[HttpProtocol]:
    """The protocol class for uvicorn's `http` setting, with these bounds (and the connections this process's
    open-files limit allows, read now)."""
    bounds = {
        "max_head_bytes": max_head_bytes,
        "client_timeout_s": client_timeout_s,
        "max_connections": resources.connections_allowed(),
    }
    return type("HttpProtocol", (HttpProtocol,), bounds)
