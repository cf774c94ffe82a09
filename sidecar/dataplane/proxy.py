"""The data plane: OpenAI requests to the engine and its answers back, each one measured.

A request is checked and admitted here (a generation request's fields and the change it gets, usage asked for:
`generation_request.py`), goes to the engine over one pool of keep-alive connections (`upstream.py`, which says
why it is not an HTTP client library), and its answer goes back through one of the relay modes (`relay.py`; the
Responses API's stream, `responses.py`; what they share, `answers.py`); what it leaves is recorded afterwards
(`recording.py`). The state of one request on its way is `exchange.py`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from starlette.types import Receive, Scope, Send

from sidecar import request_state
from sidecar.control.engine import Engine
from sidecar.dataplane.admission import Admission
from sidecar.dataplane.backlog import Backlog
from sidecar.dataplane.chunks import Assembler
from sidecar.dataplane.exchange import (
    ClientWatch,
    Deadline,
    Exchange,
    encoded,
    request_bytes,
    request_headers,
)
from sidecar.dataplane.generation_request import asking_for_usage, count_prompt, generation_fields, whole_only
from sidecar.dataplane.messages import MessagesRelay
from sidecar.dataplane.performance import PerformanceMeter
from sidecar.dataplane.recording import Recorder, unanswered
from sidecar.dataplane.relay import Relays
from sidecar.dataplane.responses import ResponsesRelay
from sidecar.dataplane.upstream import Response, Sending, UpstreamPool
from sidecar.dataplane.upstream_errors import (
    BadAnswer,
    ConnectFailed,
    Disconnected,
    HeadTooLarge,
    OutOfDescriptors,
)
from sidecar.errors import (
    BadGateway,
    GatewayTimeout,
    MethodNotAllowed,
    NotFound,
    SidecarError,
    SidecarOverloaded,
)
from sidecar.http import check_forwardable, engine_method, engine_target, json_object, read_body, tls_context
from sidecar.logs import Throttle, get_logger
from sidecar.settings import Settings
from sidecar.telemetry import resources
from sidecar.telemetry.history import RequestHistory
from sidecar.telemetry.otel import OpenTelemetry, RequestSpan
from sidecar.telemetry.service import Telemetry

log = get_logger("sidecar.proxy")

_KEEPALIVE_S = 4.0


class EngineHolder(Protocol):
    """What the data plane needs of whoever holds the engine: the Supervisor, or a worker's view of it."""

    @property
    def engine(self) -> Engine | None: ...

    def request_slot(self) -> contextlib.AbstractAsyncContextManager[Engine]: ...


# How an answer goes back to the client, once the engine's status says it is not an error.
RelayMode = Callable[["Exchange", Response], Awaitable[None]]


@dataclass(slots=True)
class Outgoing:
    """What a handler hands the exchange: the bytes for the engine and how its answer goes back."""

    payload: bytes
    relay: RelayMode
    measured: bool = True  # generation and embeddings: queued, timed and recorded (not a passed-through path)
    listed: bool = False  # a path the engine serves only where its adapter lists it (`data_paths`), else 404
    prompt: dict[str, Any] | None = None  # for an engine that streams no usage: counted by it meanwhile
    span: RequestSpan | None = None  # OpenTelemetry's, where it is on
    errors: RelayMode | None = None  # how the engine's errors go back, where not in the OpenAI shape


class Proxy:
    """The data plane's handlers (chat and text completions, embeddings, responses, the engine's other paths): each
    request checked, admitted, sent to the engine over one pool of connections, its answer relayed and measured."""

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
        self.telemetry = telemetry
        self.upstream = UpstreamPool(
            settings.upstream_connect_timeout_s,
            _KEEPALIVE_S,
            tls_context(settings.upstream_ca_file),
            settings.max_header_bytes,
        )
        self._out_of_descriptors_lines = Throttle(5.0)
        self.recorder = Recorder(telemetry, history, worker, otel)
        self.relays = Relays(settings, self.recorder)
        self.responses_relay = ResponsesRelay(settings, self.recorder)
        self.messages_relay = MessagesRelay(settings, self.recorder)
        self.backlog = Backlog()  # a finished request's record, metrics and access line

    def close(self) -> None:
        self.upstream.close()

    def _assembled(self, stream: bool, body: dict[str, Any]) -> bool:
        """Whether a request is streamed from the engine and its answer assembled for a non-streaming client: unless
        assembly is off, or the request asks for what only a whole answer has (`whole_only`)."""
        return not stream and self.settings.assemble_non_streaming and not whole_only(body)

    async def generate(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Chat and text completions: streamed through, or streamed from the engine and assembled."""
        raw = await read_body(receive)
        body = json_object(raw)  # a bad body is a 400 whether or not an engine is loaded
        start_ns = time.perf_counter_ns()
        stream, options, n = generation_fields(body)
        client_usage = stream and options is not None and options.get("include_usage") is True
        loaded = self.supervisor.engine
        assemble = self._assembled(stream, body) and (loaded is None or loaded.assembles)
        translated = loaded.adapter.translate_request(body) if loaded is not None else body
        if stream and not client_usage or assemble:
            # Ask for usage to count tokens; the chunk is removed again before the client sees it. Usage in every
            # chunk (vLLM's `continuous_usage_stats`) counts only with include_usage: the client's stays off.
            asked = {key: value for key, value in (options or {}).items() if key != "continuous_usage_stats"}
            sent = translated | {"stream": True, "stream_options": asked | {"include_usage": True}}
            spliced = asking_for_usage(raw, body) if translated is body else None
            payload = spliced if spliced is not None else request_bytes(sent)
        else:
            sent = translated
            # The bytes as the client sent them, unless the body changed: then serialized once.
            payload = raw if sent is body else request_bytes(sent)
        chat = scope["path"].endswith("/chat/completions")
        # Held for the whole answer: of a large body, only the bytes for the engine, and the parsed prompt only for
        # an engine that counts it (the client's bytes and its JSON would triple a long prompt's memory).
        prompt = sent if loaded is None or not loaded.adapter.streams_usage else None
        # Started where nothing can fail before the exchange, which ends it.
        span = self.otel.start_request(scope, body) if self.otel is not None else None
        del raw, body, translated, sent

        async def relay(exchange: Exchange, response: Response) -> None:
            exchange.client_usage = client_usage
            if n > 1:
                exchange.choices_left = set(range(n))
            if response.content_type != "text/event-stream":
                await self.relays.whole(exchange, response)
            elif stream:
                await self.relays.stream(exchange, response)
            else:
                await self.relays.assembled(exchange, response, Assembler(chat))

        await self._exchange(scope, receive, send, start_ns, Outgoing(payload, relay, prompt=prompt, span=span))

    async def embeddings(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = await read_body(receive)
        body = json_object(raw)
        start_ns = time.perf_counter_ns()
        span = self.otel.start_request(scope, body) if self.otel is not None else None
        del body
        # Its answer has its usage at its end (vLLM's) or head (llama-server's): `performance` goes in unparsed.
        relay = functools.partial(self.relays.whole, splice_usage=True)
        await self._exchange(scope, receive, send, start_ns, Outgoing(raw, relay, span=span))

    async def responses(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The Responses API, for an engine whose adapter lists it: the answer streamed through (`responses.py`),
        or for a non-streaming client streamed from the engine and answered with its last event's response;
        measured either way."""
        raw = await read_body(receive)
        body = json_object(raw)
        start_ns = time.perf_counter_ns()
        stream = generation_fields(body)[0]
        # Streamed from the engine either way, for a TTFT: a non-streaming client gets the response it ends with.
        assemble = self._assembled(stream, body)
        payload = request_bytes(body | {"stream": True}) if assemble else raw
        span = self.otel.start_request(scope, body) if self.otel is not None else None
        del raw, body

        async def relay(exchange: Exchange, response: Response) -> None:
            if response.content_type != "text/event-stream":
                await self.relays.whole(exchange, response)
            elif stream:
                await self.responses_relay.stream(exchange, response)
            else:
                await self.responses_relay.assembled(exchange, response)

        await self._exchange(scope, receive, send, start_ns, Outgoing(payload, relay, listed=True, span=span))

    async def messages(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Anthropic's Messages API, for an engine whose adapter lists it (vLLM, SGLang, llama-server): a stream
        relayed and measured event by event (`messages.py`); a non-streaming request without tools streamed from the
        engine and answered with the message it builds, one with tools answered as the engine wrote it; both with
        `usage.performance`, the engine's errors in its own shape."""
        raw = await read_body(receive)
        body = json_object(raw)
        start_ns = time.perf_counter_ns()
        stream = generation_fields(body)[0]  # `stream` checked: a wrong type is the client's 400, as for chat
        # Streamed from the engine for a TTFT where the engine's whole answer is known to be the one its stream
        # builds, but with tools: an engine may stream a call it refuses unstreamed (vLLM's named tool).
        loaded = self.supervisor.engine
        known = loaded is not None and loaded.adapter.whole_message is not None
        assemble = self._assembled(stream, body) and known and "tools" not in body
        payload = request_bytes(body | {"stream": True}) if assemble else raw
        span = self.otel.start_request(scope, body) if self.otel is not None else None
        del raw, body
        messages = self.messages_relay

        async def relay(exchange: Exchange, response: Response) -> None:
            if response.content_type != "text/event-stream":
                await self.relays.whole(exchange, response)
            elif stream:
                await messages.stream(exchange, response)
            else:
                await messages.assembled(exchange, response)

        outgoing = Outgoing(payload, relay, listed=True, span=span, errors=messages.error)
        await self._exchange(scope, receive, send, start_ns, outgoing)

    async def passthrough(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Another /v1/* path the engine's adapter lists (`data_paths`): the request and the answer as they are,
        the answer streamed. Every other path is 404 without reaching the engine."""
        check_forwardable(scope)  # a 400 before the body is read
        payload = await read_body(receive)
        start_ns = time.perf_counter_ns()
        outgoing = Outgoing(payload, self.relays.raw, measured=False, listed=True)
        await self._exchange(scope, receive, send, start_ns, outgoing)

    async def _exchange(self, scope: Scope, receive: Receive, send: Send, start_ns: int, outgoing: Outgoing) -> None:
        """One request through to the engine and back, holding the engine (drain waits for it).

        A client that disconnects cancels the exchange wherever it is, waiting for the engine's headers or
        relaying its answer; closing the engine's unfinished response then drops that connection, which is
        what makes the engine abort the request. An engine that streams no usage is asked to count the `prompt`
        at the same time as it gets the request.
        """
        # Passed-through paths (the model list, tokenizers) are not generation: no queue for them.
        measured, span = outgoing.measured, outgoing.span
        admission = self.admission.slot(receive) if measured else contextlib.nullcontext()
        try:
            async with admission, self.supervisor.request_slot() as engine:
                if outgoing.listed and not engine.adapter.serves(engine_method(scope), scope["path"]):
                    raise _not_served(engine, scope["method"], scope["path"])
                await self._exchange_admitted(scope, send, start_ns, engine, outgoing)
        except BaseException as exc:  # refused before the engine had it, or the client gone while queued
            if span is not None and self.otel is not None:
                self.otel.end_unanswered(span, *unanswered(exc))
            raise

    async def _exchange_admitted(
        self, scope: Scope, send: Send, start_ns: int, engine: Engine, outgoing: Outgoing
    ) -> None:
        measured, prompt, span = outgoing.measured, outgoing.prompt, outgoing.span
        # The clock starts now: time spent in the sidecar's queue is queue_ms, never the engine's TTFT.
        admitted_ns = time.perf_counter_ns()
        # The engine gets the request first; what can wait (the meter, the deadline, the client watch, the GPU
        # window) is set up while it works on it.
        sending = self._send(scope, engine, outgoing.payload, measured, span)
        try:
            meter = PerformanceMeter(admitted_ns, queue_ns=admitted_ns - start_ns)
            settings = self.settings
            deadline = Deadline(
                meter,
                settings.upstream_first_token_timeout_s,
                settings.upstream_inter_token_timeout_s,
                request_state.of(scope),
            )
            exchange = Exchange(scope, send, engine, meter, deadline, span=span)
            exchange.gpu_window = self.telemetry.window()
            if prompt is not None and not engine.adapter.streams_usage:
                exchange.prompt_count = asyncio.create_task(count_prompt(self.upstream, engine, prompt))
        except BaseException:
            sending.close()
            raise
        meter.overhead_ns += time.perf_counter_ns() - admitted_ns
        try:
            with ClientWatch(exchange):
                response = await self._opened(exchange, sending)
                try:
                    if response.status >= 400:
                        await (outgoing.errors or self.relays.error)(exchange, response)
                    else:
                        await outgoing.relay(exchange, response)
                finally:
                    response.close()  # after a full read the connection is back in the pool; else dropped
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not exchange.client_disconnected or task is None or task.uncancel() > 0:
                raise  # cancelled by someone else: the server is stopping
        except SidecarError as exc:
            exchange.failure = unanswered(exc)  # not the error itself: its traceback holds the exchange
            raise
        finally:
            deadline.close()
            if exchange.prompt_count is not None:
                exchange.prompt_count.cancel()  # the answer was cut: its usage is not reported
            if measured:  # measured now, recorded once nothing more urgent waits
                if exchange.performance is None:
                    self.recorder.finish(exchange, time.perf_counter_ns())
                self.backlog.add(functools.partial(self.recorder.record, exchange, time.time_ns()))

    def _send(self, scope: Scope, engine: Engine, payload: bytes, json_body: bool, span: RequestSpan | None) -> Sending:
        """The request to the engine, written now where a connection to it is idle."""
        request_id = engine.adapter.engine_request_id(request_state.of(scope).engine_request_id)
        # The engine's spans join the request's trace.
        trace = encoded(self.otel.context_headers(span)) if span is not None and self.otel is not None else None
        headers = request_headers(scope, request_id, json_body, engine, trace)
        return self.upstream.send(engine_method(scope), engine.base_url, engine_target(scope), headers, payload)

    async def _opened(self, exchange: Exchange, sending: Sending) -> Response:
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
        except HeadTooLarge as exc:
            log.warning("engine_answer_too_large", path=exchange.scope["path"], held="headers")
            raise BadGateway(f"{exc} (SIDECAR_MAX_HEADER_BYTES)", code="engine_answer_too_large") from None
        except BadAnswer as exc:
            raise BadGateway(str(exc)) from None
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


def _not_served(engine: Engine, method: str, path: str) -> SidecarError:
    """A path the engine's adapter does not pass through: 405 naming the methods it does pass on it, else 404."""
    allowed = engine.adapter.methods_served(path)
    if allowed:
        return MethodNotAllowed.on(method, path, ", ".join(allowed))
    return NotFound(f"no route {method} {path} for a data key", param="path")
