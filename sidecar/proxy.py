"""The data plane: OpenAI requests to the engine and its answers back, each one measured.

One pool of keep-alive connections to the engine serves every request (`sidecar/upstream.py`, which says why it
is not an HTTP client library).

Streams pass through as they are read, forwarded as the engine wrote them; only the usage chunk
is ever re-serialized. Each event is checked for output on its raw bytes (`chunks.has_output`), which is
what timestamps it; JSON is parsed only for chunks that carry usage or timings, or when `n` > 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from starlette.types import Receive, Scope, Send

from sidecar import resources
from sidecar.admission import Admission
from sidecar.backlog import Backlog
from sidecar.chunks import (
    Assembler,
    carries_measures,
    choice_has_output,
    engine_timings,
    has_output,
    is_usage_chunk,
)
from sidecar.engine import Engine
from sidecar.errors import (
    BadGateway,
    BadRequest,
    GatewayTimeout,
    NotFound,
    SidecarError,
    SidecarOverloaded,
    engine_error_body,
)
from sidecar.history import OWNER_FIELD, RequestHistory
from sidecar.http import check_forwardable, engine_target, header, json_object, read_body
from sidecar.http_server import CLIENT_GONE, CLIENT_WRITES, ON_CLIENT_GONE
from sidecar.logs import Throttle, get_logger
from sidecar.middleware.request_context import CLIENT_TIMED_OUT, log_fields
from sidecar.otel import Answer, OpenTelemetry, RequestSpan, finish_reasons
from sidecar.performance import PerformanceMeter
from sidecar.settings import Settings
from sidecar.sse import DONE, SSEParser
from sidecar.telemetry import GpuWindow, Telemetry
from sidecar.upstream import (
    ConnectFailed,
    Disconnected,
    OutOfDescriptors,
    Response,
    Sending,
    UpstreamError,
    UpstreamPool,
    tls_context,
)

log = get_logger("sidecar.proxy")

_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers"}
    | {"transfer-encoding", "upgrade"}
)
# The engine never sees the client's key; it gets identity encoding (the proxy reads the stream) and our request id.
_REQUEST_HEADERS_DROPPED = _HOP_BY_HOP | {
    "host",
    "content-length",
    "authorization",
    "x-api-key",
    "accept-encoding",
    "expect",
    "x-request-id",
}
# The sidecar's server sets its own date, server and request id; lengths are recomputed where bodies change.
_RESPONSE_HEADERS_DROPPED = _HOP_BY_HOP | {"content-length", "date", "server", "x-request-id"}
_ERROR_BODY_LIMIT = 1024 * 1024
_KEEPALIVE_S = 4.0
# How long the end of an answer waits for the engine's count of the prompt (asked when the request went out; an
# engine that serves one request at a time answers it as the generation ends).
_PROMPT_COUNT_WAIT_S = 5.0
_JSON = (b"content-type", b"application/json")
_JSON_STR = ("content-type", "application/json")


class EngineHolder(Protocol):
    """What the data plane needs of whoever holds the engine: the Supervisor, or a worker's view of it."""

    @property
    def engine(self) -> Engine | None: ...

    def request_slot(self) -> contextlib.AbstractAsyncContextManager[Engine]: ...


def _dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:  # an integer beyond 64 bits, or nesting beyond orjson's 254 levels: the standard library's
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _request_bytes(body: dict[str, Any]) -> bytes:
    """A changed request body serialized for the engine; 400 where it nests too deeply to be written again (the
    parser reads 1024 levels, the writers fewer)."""
    try:
        return _dumps(body)
    except RecursionError:
        raise BadRequest("request body is JSON nested too deeply", code="invalid_json") from None


def _request_headers(scope: Scope, request_id: str, json_body: bool, engine: Engine) -> dict[str, str]:
    named_in_connection = {name.strip().lower() for name in (header(scope, b"connection") or "").split(",")}
    forwarded = {
        name: value.decode("latin-1")
        for raw_name, value in scope["headers"]
        if (name := raw_name.decode("latin-1")) not in _REQUEST_HEADERS_DROPPED and name not in named_in_connection
    }
    forwarded["x-request-id"] = request_id
    if json_body:  # checked to be JSON already: say so, whatever the client's curl -d claimed
        forwarded["content-type"] = "application/json"
    if engine.upstream_headers:  # a hosted engine's key and headers, from its load request
        forwarded.update(engine.upstream_headers)
    return forwarded


def _response_headers(response: Response, drop: Iterable[str] = ()) -> list[tuple[bytes, bytes]]:
    dropped = _RESPONSE_HEADERS_DROPPED.union(drop)
    return [
        (name.lower(), value) for name, value in response.raw_headers if name.decode("latin-1").lower() not in dropped
    ]


def _header_timings(response: Response) -> dict[str, Any] | None:
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


async def _send_whole(exchange: _Exchange, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    """A response whose body is known whole: its length, then the body in one message."""
    headers.append((b"content-length", str(len(body)).encode()))
    await exchange.send({"type": "http.response.start", "status": status, "headers": headers})
    await exchange.send({"type": "http.response.body", "body": body})


def _sse_error(error: SidecarError) -> bytes:
    return b"data: " + _dumps(error.body()) + b"\n\ndata: [DONE]\n\n"


def _loads(data: bytes) -> dict[str, Any] | None:
    """An event's JSON object, or None: what is not JSON passes through unmeasured rather than failing."""
    try:
        value = orjson.loads(data)
    except ValueError:
        try:  # what the standard library still reads (an engine's -Infinity): measured and assembled all the same
            value = json.loads(data)
        except (ValueError, RecursionError):
            return None
    return value if isinstance(value, dict) else None


# How an answer goes back to the client, once the engine's status says it is not an error.
Relay = Callable[["_Exchange", Response], Awaitable[None]]


class _Deadline:
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
        self, meter: PerformanceMeter, first_token_s: float, inter_token_s: float, state: dict[str, Any]
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._meter = meter
        self._state = state  # the request's scope state: whether the relay is waiting on the client
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
            writes = self._state.get(CLIENT_WRITES)
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

    def __enter__(self) -> _Deadline:
        task = asyncio.current_task()
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
class _Exchange:
    """One request on its way through: what it asked for, and what has been measured of it."""

    scope: Scope
    receive: Receive
    send: Send
    engine: Engine
    meter: PerformanceMeter
    deadline: _Deadline
    client_usage: bool = False  # the client asked for the usage chunk
    several_choices: bool = False
    usage: dict[str, Any] | None = None
    timings: dict[str, Any] | None = None
    performance: dict[str, Any] | None = None
    status: int | None = None
    client_disconnected: bool = False
    error: str | None = None  # the code of the error that cut a stream short after its status went out
    client_done: bool = False  # the client's response is complete (a stream ends with [DONE])
    gpu_window: GpuWindow | None = None
    prompt_count: asyncio.Task[int | None] | None = None  # the engine counting the prompt (it streams no usage)
    # OpenTelemetry's span, where it is on; then also what the span says of the answer's end.
    span: RequestSpan | None = None
    failure: SidecarError | None = None  # the error that ended the exchange before its status went out
    finish_reasons: list[str] | None = None  # from the chunks parsed on the way
    final_events: tuple[bytes | dict[str, Any], ...] = ()


class Proxy:
    def __init__(
        self,
        settings: Settings,
        supervisor: EngineHolder,
        history: RequestHistory,
        telemetry: Telemetry,
        admission: Admission,
        worker: int | None = None,
        otel: OpenTelemetry | None = None,
    ) -> None:
        self.settings = settings
        self.otel = otel
        self.supervisor = supervisor
        self.admission = admission
        self.worker = worker  # which data-plane worker this is, where there are several
        self.history = history
        self.telemetry = telemetry
        self.upstream = UpstreamPool(
            settings.upstream_connect_timeout_s, _KEEPALIVE_S, tls_context(settings.upstream_ca_file)
        )
        self._out_of_descriptors_lines = Throttle(5.0)
        self.backlog = Backlog()  # a finished request's record, metrics and access line

    def close(self) -> None:
        self.upstream.close()

    # -- endpoints (ASGI) -----------------------------------------------------------------------------------

    async def generate(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Chat and text completions: streamed through, or streamed from the engine and assembled."""
        raw = await read_body(receive)
        body = json_object(raw)  # a bad body is a 400 whether or not an engine is loaded
        start_ns = time.perf_counter_ns()
        stream, options, n = _generation_fields(body)
        client_usage = stream and options is not None and options.get("include_usage") is True
        loaded = self.supervisor.engine
        assemble = not stream and self.settings.assemble_non_streaming
        translated = loaded.adapter.translate_request(body) if loaded is not None else body
        if stream and not client_usage or assemble:
            # Ask for usage to count tokens; the chunk is removed again before the client sees it.
            sent = translated | {"stream": True, "stream_options": (options or {}) | {"include_usage": True}}
            spliced = _asking_for_usage(raw, body) if translated is body else None
            payload = spliced if spliced is not None else _request_bytes(sent)
        else:
            sent = translated
            # The bytes as the client sent them, unless the body changed: then serialized once.
            payload = raw if sent is body else _request_bytes(sent)
        chat = scope["path"].endswith("/chat/completions")
        # Held for the whole answer: of a large body, only the bytes for the engine, and the parsed prompt only for
        # an engine that counts it (the client's bytes and its JSON would triple a long prompt's memory).
        prompt = sent if loaded is None or not loaded.adapter.streams_usage else None
        # Started where nothing can fail before the exchange, which ends it.
        span = self.otel.start_request(scope, body) if self.otel is not None else None
        del raw, body, translated, sent

        async def relay(exchange: _Exchange, response: Response) -> None:
            exchange.client_usage = client_usage
            exchange.several_choices = n > 1
            if response.content_type != "text/event-stream":
                await self._relay_whole(exchange, response)
            elif stream:
                await self._relay_stream(exchange, response)
            else:
                await self._relay_assembled(exchange, response, Assembler(chat))

        await self._exchange(scope, receive, send, start_ns, payload, relay, prompt=prompt, span=span)

    async def embeddings(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = await read_body(receive)
        body = json_object(raw)
        start_ns = time.perf_counter_ns()
        span = self.otel.start_request(scope, body) if self.otel is not None else None
        del body
        await self._exchange(scope, receive, send, start_ns, raw, self._relay_whole, span=span)

    async def passthrough(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Another /v1/* path the engine's adapter lists (`data_paths`): the request and the answer as they are,
        the answer streamed. Every other path is 404 without reaching the engine."""
        check_forwardable(scope)  # a 400 before the body is read
        payload = await read_body(receive)
        start_ns = time.perf_counter_ns()
        await self._exchange(scope, receive, send, start_ns, payload, self._relay_raw, measured=False)

    async def _exchange(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        start_ns: int,
        payload: bytes,
        relay: Relay,
        measured: bool = True,
        prompt: dict[str, Any] | None = None,
        span: RequestSpan | None = None,
    ) -> None:
        """One request through to the engine and back, holding the engine (drain waits for it).

        A client that disconnects cancels the exchange wherever it is, waiting for the engine's headers or
        relaying its answer; closing the engine's unfinished response then drops that connection, which is
        what makes the engine abort the request. An engine that streams no usage is asked to count the `prompt`
        at the same time as it gets the request.
        """
        # Passed-through paths (the model list, tokenizers) are not generation: no queue for them.
        admission = self.admission.slot(receive) if measured else contextlib.nullcontext()
        try:
            async with admission, self.supervisor.request_slot() as engine:
                if not measured and not engine.adapter.serves(scope["method"], scope["path"]):
                    raise NotFound(f"no route {scope['method']} {scope['path']} for a data key", param="path")
                await self._exchange_admitted(
                    scope, receive, send, start_ns, engine, payload, relay, measured, prompt, span
                )
        except BaseException as exc:  # refused before the engine had it, or the client gone while queued
            if span is not None and self.otel is not None:
                self.otel.end_unanswered(span, *_unanswered(exc))
            raise

    async def _exchange_admitted(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        start_ns: int,
        engine: Engine,
        payload: bytes,
        relay: Relay,
        measured: bool,
        prompt: dict[str, Any] | None,
        span: RequestSpan | None,
    ) -> None:
        # The clock starts now: time spent in the sidecar's queue is queue_ms, never the engine's TTFT.
        admitted_ns = time.perf_counter_ns()
        # The engine gets the request first; what can wait (the meter, the deadline, the client watch, the GPU
        # window) is set up while it works on it.
        sending = self._send(scope, engine, payload, measured, span)
        try:
            meter = PerformanceMeter(admitted_ns, queue_ns=admitted_ns - start_ns)
            settings = self.settings
            deadline = _Deadline(
                meter, settings.upstream_first_token_timeout_s, settings.upstream_inter_token_timeout_s, scope["state"]
            )
            exchange = _Exchange(scope, receive, send, engine, meter, deadline, span=span)
            exchange.gpu_window = self.telemetry.window()
            if prompt is not None and not engine.adapter.streams_usage:
                exchange.prompt_count = asyncio.create_task(self._count_prompt(engine, prompt))
        except BaseException:
            sending.close()
            raise
        meter.overhead_ns += time.perf_counter_ns() - admitted_ns
        try:
            with _ClientWatch(exchange):
                response = await self._opened(exchange, sending)
                try:
                    if response.status >= 400:
                        await self._relay_error(exchange, response)
                    else:
                        await relay(exchange, response)
                finally:
                    response.close()  # after a full read the connection is back in the pool; else dropped
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not exchange.client_disconnected or task is None or task.uncancel() > 0:
                raise  # cancelled by someone else: the server is stopping
        except SidecarError as exc:
            exchange.failure = exc
            raise
        finally:
            deadline.close()
            if exchange.prompt_count is not None:
                exchange.prompt_count.cancel()  # the answer was cut: its usage is not reported
            if measured:  # measured now, recorded once nothing more urgent waits
                if exchange.performance is None:
                    self._finish(exchange, time.perf_counter_ns())
                self.backlog.add(functools.partial(self._record, exchange, int(time.time())))

    # -- the engine's side ----------------------------------------------------------------------------------

    def _send(self, scope: Scope, engine: Engine, payload: bytes, json_body: bool, span: RequestSpan | None) -> Sending:
        """The request to the engine, written now where a connection to it is idle."""
        request_id = engine.adapter.engine_request_id(scope["state"]["request_id"])
        headers = _request_headers(scope, request_id, json_body, engine)
        if span is not None and self.otel is not None:  # the engine's spans join the request's trace
            headers.update(self.otel.context_headers(span))
        return self.upstream.send(scope["method"], engine.base_url, engine_target(scope), headers.items(), payload)

    async def _opened(self, exchange: _Exchange, sending: Sending) -> Response:
        """The engine's response headers, or 502/504."""
        try:
            with exchange.deadline:
                return await sending.response()
        except TimeoutError:  # the connect timeout is a TimeoutError too
            raise GatewayTimeout("the engine did not start answering within the timeout") from None
        except OutOfDescriptors:
            raise self._out_of_descriptors() from None
        except ConnectFailed as exc:
            raise BadGateway(f"could not connect to the engine: {exc}") from None
        except Disconnected as exc:
            raise BadGateway(f"{exc} before answering") from None

    def _out_of_descriptors(self) -> SidecarOverloaded:
        """No descriptor left for a connection to the engine: the sidecar's limit, not the engine, which a 502 would
        blame."""
        if refused := self._out_of_descriptors_lines.due():
            log.warning("open_files_exhausted", open_files_limit=resources.open_files_limit(), refused=refused)
        return SidecarOverloaded(
            "the sidecar is out of file descriptors for a connection to the engine (its open-files limit): retry later"
        )

    async def _count_prompt(self, engine: Engine, body: dict[str, Any]) -> int | None:
        """The prompt's tokens, counted by the engine's own tokenizer; None where it cannot say."""
        question = engine.adapter.prompt_count_request(body)
        if question is None:
            return None
        path, count_body = question
        try:
            headers = [_JSON_STR, *engine.upstream_headers.items()]
            response = await self.upstream.request("POST", engine.base_url, path, headers, _dumps(count_body))
            try:
                raw = await response.read(_ERROR_BODY_LIMIT)
            finally:
                response.close()
        except UpstreamError as exc:
            log.warning("prompt_count_failed", path=path, error=str(exc))
            return None
        if response.status != 200:
            log.warning("prompt_count_failed", path=path, status=response.status)
            return None
        return engine.adapter.prompt_count(_loads(raw))

    async def _finish_counted(self, exchange: _Exchange, end_ns: int) -> dict[str, Any]:
        """`_finish` for an answer whose usage the sidecar counts: once the engine's count of the prompt has come
        into the usage (or the wait for it is over). The time spent waiting is not the engine's: `end_ns` is."""
        task, exchange.prompt_count = exchange.prompt_count, None
        if task is not None:
            done, _ = await asyncio.wait({task}, timeout=_PROMPT_COUNT_WAIT_S)
            if not done:
                task.cancel()
                log.warning("prompt_count_late", waited_s=_PROMPT_COUNT_WAIT_S)
            elif (count := task.result()) is not None:
                exchange.usage = (exchange.usage or {}) | {"prompt_tokens": count}
        return self._finish(exchange, end_ns)

    # -- answers --------------------------------------------------------------------------------------------

    async def _relay_error(self, exchange: _Exchange, response: Response) -> None:
        """The engine's 4xx/5xx: its status kept, its body in the OpenAI shape."""
        try:
            async with asyncio.timeout(self.settings.upstream_inter_token_timeout_s):
                raw = await response.read(_ERROR_BODY_LIMIT)
        except (TimeoutError, UpstreamError):
            raw = b""
        exchange.status = response.status
        body = _dumps(engine_error_body(response.status, raw))
        await _send_whole(exchange, response.status, [*_response_headers(response, drop={"content-type"}), _JSON], body)

    async def _relay_whole(self, exchange: _Exchange, response: Response) -> None:
        """A non-streamed JSON answer: `usage.performance` added, and the same in X-Performance-Metrics."""
        try:
            async with asyncio.timeout(self.settings.upstream_inter_token_timeout_s):
                raw = await response.read()
        except TimeoutError:
            raise GatewayTimeout("the engine stopped answering within the timeout") from None
        except UpstreamError:
            raise BadGateway("the engine closed the connection mid-answer") from None
        now = time.perf_counter_ns()
        exchange.meter.whole_body(now)
        exchange.status = response.status
        headers = _response_headers(response)
        body = _loads(raw)
        if body is not None:
            if exchange.span is not None:
                exchange.final_events = (body,)
            usage = body.get("usage")
            exchange.usage = usage if isinstance(usage, dict) else None
            exchange.timings = engine_timings(body) or _header_timings(response)
            raw, performance = self._with_performance(exchange, body, now)
            headers.append((b"x-performance-metrics", performance))
        exchange.meter.overhead_ns += time.perf_counter_ns() - now
        await _send_whole(exchange, response.status, headers, raw)

    async def _relay_raw(self, exchange: _Exchange, response: Response) -> None:
        send = exchange.send
        headers = _response_headers(response)
        if response.content_length is not None:  # the bytes go through unchanged: the engine's length holds
            headers.append((b"content-length", str(response.content_length).encode()))
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.settings.upstream_inter_token_timeout_s) as deadline:
                while chunk := await response.readany():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    deadline.reschedule(loop.time() + self.settings.upstream_inter_token_timeout_s)
        except (UpstreamError, TimeoutError) as exc:
            # The status is sent: leaving the body unfinished makes the server drop the connection, so the
            # client sees a cut answer rather than a short one that looks whole.
            log.warning("engine_answer_cut", path=exchange.scope["path"], error=exc.__class__.__name__)
            return
        await send({"type": "http.response.body", "body": b""})

    async def _relay_stream(self, exchange: _Exchange, response: Response) -> None:
        """SSE through as it is read; the usage chunk removed, or given `usage.performance`."""
        send = exchange.send
        exchange.status = response.status
        exchange.timings = _header_timings(response)
        await send({"type": "http.response.start", "status": response.status, "headers": _response_headers(response)})
        error = await self._pump(exchange, response, None)
        if exchange.prompt_count is not None and exchange.performance is None and error is None:
            await self._finish_counted(exchange, time.perf_counter_ns())  # for the record, after the client's answer
        if error is not None and not exchange.client_done:
            # The status went out with the first event: the stream says what happened, then ends as streams do.
            exchange.error = error.code
            await send({"type": "http.response.body", "body": _sse_error(error)})
        elif not exchange.client_done:
            await send({"type": "http.response.body", "body": b""})

    async def _relay_assembled(self, exchange: _Exchange, response: Response, assembler: Assembler) -> None:
        """A non-streaming request streamed from the engine (for its TTFT), answered as the engine would."""
        exchange.timings = _header_timings(response)
        error = await self._pump(exchange, response, assembler)
        if error is not None:
            raise error
        now = time.perf_counter_ns()
        exchange.status = response.status
        if assembler.usage is None:  # the engine streams no usage: the sidecar's count
            await self._finish_counted(exchange, now)
            exchange.usage = self._counted_usage(exchange)
        raw, performance = self._with_performance(exchange, assembler.result(), now)
        headers = [*_response_headers(response, drop={"content-type"}), _JSON, (b"x-performance-metrics", performance)]
        exchange.meter.overhead_ns += time.perf_counter_ns() - now
        await _send_whole(exchange, response.status, headers, raw)

    async def _pump(self, exchange: _Exchange, response: Response, assembler: Assembler | None) -> SidecarError | None:
        """Read the engine's SSE stream to its end, timestamping every event; forward the events to the client
        as each read brings them (nothing waits for a later read), or give them to the assembler.

        None when the stream ended, else the error that cut it short (the exchange's deadline: the first-token
        timeout until the first output, then the inter-token timeout from each read).
        """
        meter = exchange.meter
        send = exchange.send
        parse_every = assembler is not None or exchange.several_choices
        clock = time.perf_counter_ns
        parser = SSEParser()
        last_data = b""  # the last chunk, for a usage chunk the engine did not send
        read = response.readany
        previous_data = b""  # and the one before it: the last with choices, where the last is the usage chunk
        done = False
        deadline = exchange.deadline
        try:
            with deadline:
                while True:
                    chunk = await read()
                    deadline.read_ns = now = clock()
                    out: list[bytes] = []
                    for event in parser.feed(chunk) if chunk else parser.close():
                        data = event.data
                        raw: bytes | None = event.raw
                        if data == DONE:
                            done = True
                            exchange.final_events = (previous_data, last_data)
                            if exchange.client_usage and exchange.performance is None and assembler is None:
                                out.append(await self._counted_usage_event(exchange, out, last_data, now))
                        elif data is not None:
                            previous_data, last_data = last_data, data
                            if parse_every or carries_measures(data):
                                parsed = _loads(data)
                                if parsed is not None:
                                    self._measure_parsed(exchange, parsed, now)
                                    if assembler is not None:
                                        assembler.add(parsed)
                                    elif is_usage_chunk(parsed):
                                        raw = self._usage_event(exchange, parsed)
                            elif has_output(data):
                                meter.output(now)
                        if raw is not None and assembler is None:
                            out.append(raw)
                    if out and not exchange.client_done:
                        # One write for what one read brought: an engine's events that arrived together. After
                        # [DONE] the answer is complete: the end of the body goes in the same write.
                        exchange.client_done = done
                        await send({"type": "http.response.body", "body": b"".join(out), "more_body": not done})
                    meter.overhead_ns += clock() - now
                    if not chunk:
                        return None
        except TimeoutError:
            return GatewayTimeout("the engine sent no token within the timeout")
        except UpstreamError:
            return BadGateway("the engine closed the stream mid-answer")

    def _usage_event(self, exchange: _Exchange, chunk: dict[str, Any]) -> bytes | None:
        """The usage chunk for the client: with `usage.performance`, or none when only the sidecar asked."""
        if not exchange.client_usage or exchange.performance is None:
            return None
        usage = chunk["usage"] | {"performance": exchange.performance}
        return b"data: " + _dumps(chunk | {"usage": usage}) + b"\n\n"

    async def _counted_usage_event(self, exchange: _Exchange, out: list[bytes], last_data: bytes, now: int) -> bytes:
        """The usage chunk the client asked for and the engine did not send (llama-cpp-python ignores
        `stream_options`): the streamed tokens and the prompt counted. The events read before it (`out`) go to
        the client first when the prompt's count is awaited: events are never held back."""
        if exchange.prompt_count is not None and out:
            await exchange.send({"type": "http.response.body", "body": b"".join(out), "more_body": True})
            out.clear()
        last = _loads(last_data) or {}
        chunk = {key: last[key] for key in ("id", "object", "created", "model", "system_fingerprint") if key in last}
        performance = await self._finish_counted(exchange, now)
        usage = self._counted_usage(exchange) | {"performance": performance}
        return b"data: " + _dumps(chunk | {"choices": [], "usage": usage}) + b"\n\n"

    @staticmethod
    def _counted_usage(exchange: _Exchange) -> dict[str, Any]:
        """Usage as the sidecar counted it (after `_finish`): output events, and the engine's count of the prompt
        where it gave one (null where it could not: `usage.performance.tokens_estimated` says so)."""
        assert exchange.performance is not None
        prompt = (exchange.usage or {}).get("prompt_tokens")
        tokens = exchange.performance["completion_tokens"]
        total = None if prompt is None else prompt + tokens
        return {"prompt_tokens": prompt, "completion_tokens": tokens, "total_tokens": total}

    def _measure_parsed(self, exchange: _Exchange, chunk: dict[str, Any], now: int) -> None:
        meter = exchange.meter
        for choice in chunk.get("choices") or ():
            if choice_has_output(choice):
                meter.output(now, choice.get("index", 0) if exchange.several_choices else 0)
        if exchange.span is not None:  # for the trace: why each choice ended
            reasons = finish_reasons(chunk)
            if reasons:
                exchange.finish_reasons = (exchange.finish_reasons or []) + reasons
        timings = engine_timings(chunk)
        if timings is not None:
            exchange.timings = timings
        if isinstance(chunk.get("usage"), dict):
            exchange.usage = chunk["usage"]
            if is_usage_chunk(chunk) and exchange.performance is None:
                self._finish(exchange, now)  # the usage chunk ends the answer: [DONE] follows

    # -- bookkeeping ----------------------------------------------------------------------------------------

    def _with_performance(self, exchange: _Exchange, body: dict[str, Any], now: int) -> tuple[bytes, bytes]:
        """The body with `usage.performance`, and the same object for the X-Performance-Metrics header."""
        performance = exchange.performance or self._finish(exchange, now)
        body["usage"] = (exchange.usage or {}) | {"performance": performance}
        return _dumps(body), json.dumps(performance, separators=(",", ":")).encode()  # a header: ASCII

    def _finish(self, exchange: _Exchange, end_ns: int) -> dict[str, Any]:
        engine = exchange.engine
        gpu_peak, gpu_delta = self.telemetry.gpu_memory(exchange.gpu_window)
        exchange.performance = exchange.meter.result(
            end_ns,
            exchange.usage,
            engine=engine.adapter.name,
            model=engine.served_model,
            engine_timings=exchange.timings,
            gpu_memory_peak_mb=gpu_peak,
            gpu_memory_delta_mb=gpu_delta,
        )
        return exchange.performance

    def _record(self, exchange: _Exchange, created: int) -> None:
        """Into the history for GET /v1/requests/{id}, the metrics, the span, and the request's access line."""
        performance = exchange.performance
        assert performance is not None
        scope = exchange.scope
        request_id = scope["state"]["request_id"]
        record: dict[str, Any] = {
            "id": request_id,
            "object": "sidecar.request",
            "created": created,
            "method": scope["method"],
            "path": scope["path"],
            "status": exchange.status,
            "client_disconnected": exchange.client_disconnected,
            "error": exchange.error,
            "performance": performance,
        }
        if self.worker is not None:
            record["worker"] = self.worker
        fingerprint = log_fields(scope).get("key_fingerprint")
        if fingerprint is not None:  # whose it is: GET /v1/requests/{id} shows it to that key (or an admin key)
            record[OWNER_FIELD] = fingerprint
        self.history.add(request_id, record)
        self.telemetry.metrics.observe_performance(performance, exchange.meter.gaps_ns)
        if exchange.span is not None and self.otel is not None:
            self.otel.end_request(exchange.span, _answer(exchange, performance))
        fields = log_fields(scope)
        if exchange.client_disconnected:
            fields["client_disconnected"] = True
            if scope["state"].get(CLIENT_TIMED_OUT):  # cut off by the server: it left its answer unread
                fields[CLIENT_TIMED_OUT] = True
        if exchange.error is not None:  # the status says 200: the line says what cut the stream
            fields["error"] = exchange.error
        fields.update({key: value for key, value in performance.items() if value is not None})


def _answer(exchange: _Exchange, performance: dict[str, Any]) -> Answer:
    """How the exchange ended, for its span: `error.type` is the sidecar's error code (or the engine's status)."""
    failure = exchange.failure
    status = failure.status_code if failure is not None else exchange.status
    if exchange.client_disconnected:
        error_type: str | None = "client_disconnected"
    elif failure is not None:
        error_type = failure.code or str(failure.status_code)
    elif exchange.error is not None:  # the stream was cut after its status went out
        error_type = exchange.error
    else:
        error_type = str(status) if status is not None and status >= 400 else None
    return Answer(
        performance,
        status,
        error_type,
        exchange.finish_reasons or (),
        exchange.final_events,
        exchange.client_disconnected,
    )


def _unanswered(exc: BaseException) -> tuple[str, int | None]:
    """A request's end before the engine had it, as `error.type` and the status the client got."""
    if isinstance(exc, SidecarError):
        return exc.code or str(exc.status_code), exc.status_code
    if isinstance(exc, asyncio.CancelledError):
        return "client_disconnected", None
    return exc.__class__.__name__, None


_ASK_FOR_USAGE = b',"stream_options":{"include_usage":true}'


def _asking_for_usage(raw: bytes, body: dict[str, Any]) -> bytes | None:
    """The client's bytes with `stream_options.include_usage` added before the object's closing brace, where that
    says exactly what serializing the changed body would: a streamed request without `stream_options`, in UTF-8.
    None for any other. Re-serializing costs as much as the prompt is long: about 175 µs for a 50 KB chat, the
    splice 4.5 µs."""
    if body.get("stream") is not True or "stream_options" in body or json.detect_encoding(raw) != "utf-8":
        return None
    end = raw.rfind(b"}")  # the object's own: only whitespace may follow it in valid JSON
    return raw[:end] + _ASK_FOR_USAGE + raw[end:]


def _generation_fields(body: dict[str, Any]) -> tuple[bool, dict[str, Any] | None, int]:
    """The fields the proxy acts on, checked: a wrong type is the client's 400, not the engine's problem."""
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise BadRequest("'stream' must be a boolean", param="stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise BadRequest("'stream_options' must be an object", param="stream_options")
    n = body.get("n")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool)):
        raise BadRequest("'n' must be an integer", param="n")
    return bool(stream), options, n or 1


class _ClientWatch:
    """While an exchange runs: the server's word that the client left (its connection lost) cancels it.

    The server's protocol calls the function this puts in the request's scope state (`http_server.ON_CLIENT_GONE`)
    when the connection is lost before the response completed; a client already gone when the exchange begins
    cancels it at once. No task waits on the client's `receive` for it: that task cost two steps of the loop a
    request, and cancelling one left a CancelledError whose traceback held the request's frames in a reference
    cycle. Leaving removes the function again, and with it the only path from the scope back to the exchange.
    """

    def __init__(self, exchange: _Exchange) -> None:
        self._exchange = exchange
        self._state: dict[str, Any] = exchange.scope.setdefault("state", {})

    def __enter__(self) -> _ClientWatch:
        owner = asyncio.current_task()
        assert owner is not None
        exchange = self._exchange

        def gone() -> None:
            if not exchange.client_done:  # a response complete is no disconnect
                exchange.client_disconnected = True
                owner.cancel()

        if self._state.get(CLIENT_GONE):
            gone()
        else:
            self._state[ON_CLIENT_GONE] = gone
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._state.pop(ON_CLIENT_GONE, None)
