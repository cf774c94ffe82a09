"""One request's way through the proxy: the exchange's state, its deadline on the engine, the watch on its client,
and the helpers for the headers and bodies it sends both ways."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.types import Message, Scope, Send

from sidecar import request_state
from sidecar.control.engine import Engine
from sidecar.dataplane.chunks import choices_usage
from sidecar.dataplane.performance import PerformanceMeter
from sidecar.dataplane.upstream import Response
from sidecar.errors import BadRequest, EngineLoop, SidecarError
from sidecar.http import header
from sidecar.request_state import RequestState
from sidecar.telemetry.otel import RequestSpan
from sidecar.telemetry.records import Performance
from sidecar.telemetry.service import GpuWindow

_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers"}
    | {"transfer-encoding", "upgrade"}
)

# The engine never sees the client's key; it gets identity encoding (the proxy reads the stream), our request id and
# our `Via` (the client's with this process's entry added). As bytes: the client's headers go on to the engine as the
# server gave them, never decoded.
_REQUEST_HEADERS_DROPPED = frozenset(
    name.encode()
    for name in _HOP_BY_HOP
    | {"host", "content-length", "authorization", "x-api-key", "accept-encoding", "expect", "x-request-id", "via"}
)
_REQUEST_HEADERS_DROPPED_JSON = _REQUEST_HEADERS_DROPPED | {b"content-type"}  # a body checked to be JSON: ours

# The sidecar's server sets its own date, server and request id; lengths are recomputed where bodies change.
# The sidecar's own headers among them: an engine's cannot pass for the sidecar's measures or worker.
_RESPONSE_HEADERS_DROPPED = _HOP_BY_HOP | {
    "content-length",
    "date",
    "server",
    "x-request-id",
    "x-performance-metrics",
    "x-sidecar-worker",
}

ERROR_BODY_LIMIT = 1024 * 1024

# This process's entry in a request's `Via` (RFC 9110 7.6.3), added on its way to the engine: a request that arrives
# with it has come round in a loop (an engine URL that leads back to a sidecar it passed through), and is refused
# at once rather than sent round again until every descriptor is taken. Random: it names the process to itself
# alone, so every process of a run and every sidecar in a chain has its own.
_VIA = b"1.1 sidecar-" + secrets.token_hex(8).encode()

JSON_TYPE = (b"content-type", b"application/json")


def dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:  # an integer beyond 64 bits, or nesting beyond orjson's 254 levels: the standard library's
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def request_bytes(body: dict[str, Any]) -> bytes:
    """A changed request body serialized for the engine; 400 where it nests too deeply to be written again (the
    parser reads 1024 levels, the writers fewer)."""
    try:
        return dumps(body)
    except RecursionError:
        raise BadRequest("request body is JSON nested too deeply", code="invalid_json") from None


def encoded(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]


def request_headers(
    scope: Scope, request_id: str, json_body: bool, engine: Engine, own: list[tuple[bytes, bytes]] | None = None
) -> list[tuple[bytes, bytes]]:
    """The headers the engine gets: the client's as it sent them (names in lower case, as ASGI servers give them; a
    repeated one repeated), less `_REQUEST_HEADERS_DROPPED` and those its `Connection` header names; then the
    sidecar's own, each in place of any of the client's by its name: the request id, `Via` with this process's
    entry added, the type of a body checked to be JSON, a hosted engine's key and headers, and `own`."""
    if engine.upstream_headers:
        own = [*(own or ()), *encoded(engine.upstream_headers)]
    dropped = _REQUEST_HEADERS_DROPPED_JSON if json_body else _REQUEST_HEADERS_DROPPED
    if own:
        dropped = dropped.union(name for name, _ in own)
    if connection := header(scope, b"connection"):
        dropped = dropped.union(name.strip().lower().encode("latin-1") for name in connection.split(","))
    forwarded: list[tuple[bytes, bytes]] = []
    via = b""
    for name, value in scope["headers"]:  # a loop, not a comprehension: one call fewer on every request
        if name not in dropped:
            forwarded.append((name, value))
        elif name == b"via":
            if _VIA in value:
                raise EngineLoop(
                    "the request came back to this sidecar: the engine's URL leads to the sidecar, not an engine"
                )
            via += value + b", "
    forwarded.append((b"via", via + _VIA))
    forwarded.append((b"x-request-id", request_id.encode("latin-1")))
    if json_body:  # checked to be JSON already: say so, whatever the client's curl -d claimed
        forwarded.append(JSON_TYPE)
    if own:
        forwarded += own
    return forwarded


def response_headers(response: Response, drop: Iterable[str] = ()) -> list[tuple[bytes, bytes]]:
    dropped = _RESPONSE_HEADERS_DROPPED.union(drop)
    return [
        (name.lower(), value) for name, value in response.raw_headers if name.decode("latin-1").lower() not in dropped
    ]


def header_timings(response: Response) -> dict[str, Any] | None:
    """TGI's `x-*-time` headers (and `x-time-per-token`), as numbers where they are."""
    timings: dict[str, Any] = {}
    for name, value in response.headers():
        lower = name.lower()
        if lower.startswith("x-") and (lower.endswith("-time") or lower == "x-time-per-token"):
            try:
                timings[lower] = float(value)
            except ValueError:
                timings[lower] = value
    return timings or None


def metadata_usage(response: Response) -> dict[str, Any] | None:
    """The usage of vLLM's embeddings as raw bytes (`encoding_format: "bytes"`), in the JSON of its `metadata`
    header; None where an answer has no such header."""
    metadata = response.header("metadata")
    usage = (loads(metadata.encode("latin-1")) or {}).get("usage") if metadata else None
    return usage if isinstance(usage, dict) else None


async def send_whole(
    exchange: Exchange, status: int, headers: list[tuple[bytes, bytes]], body: bytes | list[bytes]
) -> None:
    """A response whose body is known whole: its length, then the body in one message, or in its parts as read
    (a large answer not copied into one)."""
    parts = [body] if isinstance(body, bytes) else body
    headers.append((b"content-length", str(sum(map(len, parts))).encode()))
    await exchange.send({"type": "http.response.start", "status": status, "headers": headers})
    for part in parts[:-1]:
        await exchange.send({"type": "http.response.body", "body": part, "more_body": True})
    await exchange.send({"type": "http.response.body", "body": parts[-1] if parts else b""})


async def send_json(exchange: Exchange, response: Response, status: int, body: bytes) -> None:
    """A JSON `body` in place of the engine's answer, with its headers and `status`."""
    exchange.status = status
    await send_whole(exchange, status, [*response_headers(response, drop={"content-type"}), JSON_TYPE], body)


def send_now(send: Send, message: Message) -> bool:
    """An ASGI message sent from a callback that cannot await: True once the server has taken it; False, with
    nothing sent, where its `send` would wait (uvicorn's waits only while the client's buffer is full, before it
    writes: `tests/test_uvicorn_surface.py` checks it)."""
    sending: Coroutine[Any, Any, None] = send(message)  # type: ignore[assignment]  # an ASGI server's is a coroutine
    try:
        sending.send(None)
    except StopIteration:
        return True
    sending.close()
    return False


def sse_error(error: SidecarError) -> bytes:
    return b"data: " + dumps(error.body()) + b"\n\ndata: [DONE]\n\n"


def loads(data: bytes) -> dict[str, Any] | None:
    """An event's JSON object, or None: what is not JSON passes through unmeasured rather than failing."""
    try:
        value = orjson.loads(data)
    except ValueError:
        try:  # what the standard library still reads, measured and assembled all the same: an engine's -Infinity,
            # and bytes not UTF-8 (half a character), read as U+FFFD as the SSE standard decodes a stream
            value = json.loads(data.decode(errors="replace"))
        except (ValueError, RecursionError):
            return None
    return value if isinstance(value, dict) else None


class Deadline:
    """How long an exchange waits for the engine: the first-token timeout until output begins, then the
    inter-token timeout from the latest read (`read_ns`, which the relay sets), or from when a client that left
    its buffer full read again: the time the relay waits on the client is not the engine's silence (the client's
    own bound is the server's, `http_server`).

    Each wait on the engine runs inside `with deadline:` and, as in `asyncio.timeout`, past the limit the waiting
    task is cancelled and the block raises TimeoutError. But one timer serves the whole exchange, and a read only
    notes its time: the timer is never set later than the limit and at most `inter_token_s` ahead, and when it
    fires early it is set again. asyncio's timeouts (one a wait, moved when output begins) cost 14 µs a request.
    """

    __slots__ = (
        "_loop",
        "_meter",
        "_state",
        "_first_token_at",
        "_inter_token_s",
        "_handle",
        "_task",
        "_cancelling",
        "_expired",
        "read_ns",
    )

    def __init__(
        self, meter: PerformanceMeter, first_token_s: float, inter_token_s: float, state: RequestState
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._meter = meter
        self._state = state  # the request's: whether the relay is waiting on the client
        self._first_token_at = time.perf_counter() + first_token_s
        self._inter_token_s = inter_token_s
        self.read_ns = 0
        self._task: asyncio.Task[Any] | None = None  # the task waiting inside `with`, if one is
        self._cancelling = 0
        self._expired = False
        self._handle: asyncio.Handle | None = self._loop.call_later(min(first_token_s, inter_token_s), self._fire)

    def _fire(self) -> None:
        now = time.perf_counter()
        if self._meter.first_output_ns is None:
            due = self._first_token_at
        else:
            due = self.read_ns / 1e9 + self._inter_token_s  # perf_counter_ns's clock, in seconds
            writes = self._state.client_writes
            if writes is not None:  # the client's buffer has been full: waiting on it is not the engine's silence
                paused, since = writes
                due = now + self._inter_token_s if paused else max(due, since + self._inter_token_s)
        if due > now:
            # Early: the limit is still ahead (a read came since, or the first token's limit is further off than
            # `inter_token_s`). Never set further ahead than that, so that output beginning, which brings the
            # limit closer, needs no new timer.
            self._handle = self._loop.call_later(min(due - now, self._inter_token_s), self._fire)
            return
        self._handle = None
        if self._task is not None:
            self._expired = True
            self._task.cancel()
        # Else nothing waits on the engine now: the next `with` finds the limit past.

    def __enter__(self) -> Deadline:
        task = asyncio.current_task(self._loop)  # the loop given: not asked for again (a getpid() system call)
        assert task is not None
        self._task, self._cancelling = task, task.cancelling()
        if self._handle is None:  # the limit passed while nothing waited
            self._handle = self._loop.call_soon(self._fire)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        task, self._task = self._task, None
        if self._expired:
            self._expired = False
            assert task is not None
            # As asyncio.timeout: the cancellation was ours alone (no one else's pending) and it ended the wait.
            if task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
                raise TimeoutError from exc

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


@dataclass
class Exchange:
    """One request on its way through: what it asked for, and what has been measured of it."""

    scope: Scope
    send: Send
    engine: Engine
    meter: PerformanceMeter
    deadline: Deadline
    client_usage: bool = False  # the client asked for the usage chunk
    # With several choices (`n` > 1): the indexes whose finish_reason has not come yet; the answer ends when none
    # is left. None: one choice.
    choices_left: set[int] | None = None
    usage_chunks: int = 0  # usage-only chunks read: llama-server sends one a choice
    usage: dict[str, Any] | None = None
    ended_usage: dict[str, Any] | None = None  # several choices: the usages read in the chunks where choices end
    timings: dict[str, Any] | None = None
    performance: Performance | None = None
    status: int | None = None
    client_disconnected: bool = False
    error: str | None = None  # the code of the error that cut a stream short after its status went out
    client_done: bool = False  # the client's response is complete (a stream ends with [DONE])
    gpu_window: GpuWindow | None = None
    prompt_count: asyncio.Task[int | None] | None = None  # the engine counting the prompt (it streams no usage)
    # OpenTelemetry's span, where it is on; then also what the span says of the answer's end.
    span: RequestSpan | None = None
    # The error that ended the exchange before its status went out: its code (else status) and its status.
    failure: tuple[str, int | None] | None = None
    finish_reasons: list[str] | None = None  # from the chunks parsed on the way
    final_events: tuple[bytes | dict[str, Any], ...] = ()

    def note_usage(self, usage: dict[str, Any], usage_only: bool, ended: bool) -> bool:
        """The usage of a chunk (`usage_only`: the chunk `include_usage` adds; `ended`: one where a choice ends),
        kept; whether it ends the answer.

        With several choices, vLLM's one usage chunk comes once every choice has ended, with the whole answer's
        usage. llama-server reports each choice's apart, with the whole prompt's count: a chat in a usage chunk
        for each choice, a completion in the chunk where the choice ends. Those add up (`choices_usage`)."""
        left = self.choices_left
        if not usage_only:
            self.usage = usage
            if ended and left is not None:
                self.ended_usage = choices_usage(self.ended_usage, usage)
            return False
        self.usage_chunks += 1
        self.usage = choices_usage(self.usage, usage) if self.usage_chunks > 1 and left is not None else usage
        return not left

    def measured_usage(self) -> dict[str, Any] | None:
        """The usage `performance` counts: the engine's, its choices' added up where it reported them apart in
        the chunks where they end, and no usage chunk came for them all."""
        if self.usage_chunks == 0 and self.ended_usage is not None:
            return self.ended_usage
        return self.usage


class ClientWatch:
    """While an exchange runs: the server's word that the client left (its connection lost) cancels it.

    The server's protocol calls the function this puts in the request's scope state (`RequestState.on_client_gone`)
    when the connection is lost before the response completed; a client already gone when the exchange begins
    cancels it at once. No task waits on the client's `receive` for it, which would cost two steps of the loop a
    request. Leaving removes the function again, and with it the only path from the scope back to the exchange,
    so that no reference cycle keeps a finished exchange for the garbage collector.
    """

    def __init__(self, exchange: Exchange) -> None:
        self._exchange = exchange
        self._state = request_state.of(exchange.scope)

    def __enter__(self) -> ClientWatch:
        owner = asyncio.current_task()
        assert owner is not None
        exchange = self._exchange

        def gone() -> None:
            if not exchange.client_done:  # a response complete is no disconnect
                exchange.client_disconnected = True
                owner.cancel()

        if self._state.client_gone:
            gone()
        else:
            self._state.on_client_gone = gone
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._state.on_client_gone = None
