"""The Responses API (`POST /v1/responses`), relayed and measured.

A stream's events pass through as the engine wrote them, each as soon as it is read. An event is output when it is
a delta (`response.output_text.delta`, a reasoning, refusal or tool-call arguments delta): that is what TTFT, ITL
and latency are timed on. The event that ends the response (`response.completed`, `.incomplete` or `.failed`)
carries the whole response and its usage, in input and output tokens: it is the only one re-serialized, with
`usage.performance` added, as the usage chunk of a chat stream is. There is no `[DONE]`: the stream ends with the
engine's body.

A non-streaming request is streamed from the engine too, for its TTFT, and answered with the response object that
last event carries (whatever its status, usage or not): what the engine answers whole, built by it, not put
together here. A stream that fails with an `error` event and no response is answered with that error, in the
OpenAI shape, as a non-streaming request's failure is.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

from sidecar.dataplane.answers import end_stream, send_assembled, send_error_event, start_stream
from sidecar.dataplane.chunks import carries_measures, is_response_output, response_end, response_usage
from sidecar.dataplane.event_streams import pump_events
from sidecar.dataplane.exchange import Exchange, dumps, header_timings, loads
from sidecar.dataplane.recording import Recorder
from sidecar.dataplane.upstream import Response
from sidecar.errors import BadGateway, SidecarError
from sidecar.settings import Settings


class _Ending(NamedTuple):
    """How the engine's stream ended: the response object its last event carried, and its first `error` event
    (`{"type": "error", "code", "message", "param"}`, or the chat API's `{"error": {...}}`)."""

    response: dict[str, Any] | None
    error: dict[str, Any] | None


class ResponsesRelay:
    """The two relay modes of a Responses API answer that streams: to a streaming client, or to a whole one."""

    def __init__(self, settings: Settings, recorder: Recorder) -> None:
        self.settings = settings
        self.recorder = recorder

    async def stream(self, exchange: Exchange, response: Response) -> None:
        """The events through as they are read; the one that ends the response given `usage.performance`."""
        await start_stream(exchange, response)
        ended = await self._pump(exchange, response, forward=True)
        await end_stream(exchange, ended if isinstance(ended, SidecarError) else None)

    async def assembled(self, exchange: Exchange, response: Response) -> None:
        """A non-streaming request streamed from the engine: answered with the response its last event carries."""
        exchange.timings = header_timings(response)
        ended = await self._pump(exchange, response, forward=False)
        if isinstance(ended, SidecarError):
            try:
                raise ended
            finally:
                del ended  # its traceback holds this frame: a name left for it here would be a reference cycle
        if ended.response is not None:
            exchange.status = response.status
            await send_assembled(self.recorder, exchange, response, ended.response, time.perf_counter_ns())
        elif ended.error is not None:
            await send_error_event(exchange, response, _error_body(ended.error))
        else:
            raise BadGateway("the engine's stream ended before its response did")

    async def _pump(self, exchange: Exchange, response: Response, forward: bool) -> SidecarError | _Ending:
        """Read the engine's events to the end of its body, timestamping the output ones; with `forward`, send what
        each read brings at once. How the stream ended, or the error that cut it short."""
        meter = exchange.meter
        ended: dict[str, Any] | None = None
        failure: dict[str, Any] | None = None

        def take(data: bytes, raw: bytes, now: int) -> bytes:
            nonlocal ended, failure
            if is_response_output(data):
                meter.output(now)
            elif not forward or carries_measures(data):  # a whole answer's few others all read
                parsed = loads(data) or {}  # {}: not a JSON object, passed on unread
                if (answer := response_end(parsed)) is not None:
                    ended = answer
                    usage = response_usage(parsed)
                    self._ended(exchange, answer, usage, now)
                    if forward and usage is not None:
                        return _with_performance(raw, parsed, usage, exchange.performance)
                elif failure is None and _is_error(parsed):
                    failure = parsed
            return raw

        cut = await pump_events(exchange, response, self.settings.max_answer_bytes, take, forward)
        return cut if cut is not None else _Ending(ended, failure)

    def _ended(self, exchange: Exchange, ended: dict[str, Any], usage: dict[str, Any] | None, now: int) -> None:
        """The event that ends the response has come: the answer is measured as it ends."""
        exchange.usage = usage
        exchange.final_events = (ended,)
        self.recorder.finish(exchange, now)


def _with_performance(raw: bytes, event: dict[str, Any], usage: dict[str, Any], performance: Any) -> bytes:
    """The event that ends the response for the client: its usage with `performance`, its event name kept."""
    event["response"]["usage"] = usage | {"performance": performance}
    named = b"event: " + str(event["type"]).encode() + b"\n" if raw.startswith(b"event:") else b""
    return named + b"data: " + dumps(event) + b"\n\n"


def _is_error(event: dict[str, Any]) -> bool:
    """The Responses API's `error` event, or the chat API's `{"error": {...}}` (what vLLM's chat stream fails with)."""
    return event.get("type") == "error" or ("type" not in event and isinstance(event.get("error"), dict))


def _error_body(event: dict[str, Any]) -> dict[str, Any]:
    """An error event as the body of an engine's error: `{"error": {"message", "code", "param"}}`."""
    if "type" not in event:
        return event
    return {"error": {name: event[name] for name in ("message", "code", "param") if name in event}}
