"""Anthropic's Messages API (`POST /v1/messages`, which vLLM, SGLang and llama-server serve beside OpenAI's), relayed
and measured.

A stream's events pass through as the engine wrote them, each as soon as it is read. An event is output when it is
a content block's delta with a non-empty text, thinking or tool input, or a tool call's start
(`chunks.is_message_output`): TTFT, ITL and latency are timed on those. The prompt's tokens come in
`message_start`'s usage, the output's in `message_delta`'s, the event that ends the answer: it is the only one
re-serialized, its usage given `performance`. There is no `[DONE]`: `message_stop` and the engine's body end it.

A whole answer goes as the engine wrote it, with `usage.performance` added (`Relays.whole`): the stream a whole
answer would be assembled from holds content blocks whose pieces (a tool's input in JSON fragments) a rebuilt answer
could get wrong, so its TTFT is not measured. The engine's errors keep its shape (Anthropic's, which an Anthropic
client reads), and a stream cut short ends with Anthropic's `error` event, which the Anthropic SDK raises: it passes
over an event without a name, as the OpenAI shape's is.
"""

from __future__ import annotations

from typing import Any

from sidecar.dataplane.chunks import carries_measures, is_message_output
from sidecar.dataplane.event_streams import pump_events
from sidecar.dataplane.exchange import (
    ERROR_BODY_LIMIT,
    Exchange,
    dumps,
    loads,
    response_headers,
    send_whole,
)
from sidecar.dataplane.recording import Recorder
from sidecar.dataplane.relay import end_stream, error_body, start_stream
from sidecar.dataplane.upstream import Response
from sidecar.errors import SidecarError
from sidecar.settings import Settings


class MessagesRelay:
    """A Messages API stream to the client, and the engine's errors as it wrote them."""

    def __init__(self, settings: Settings, recorder: Recorder) -> None:
        self.settings = settings
        self.recorder = recorder

    async def stream(self, exchange: Exchange, response: Response) -> None:
        """The events through as they are read; `message_delta` given `usage.performance`."""
        await start_stream(exchange, response)
        meter = exchange.meter

        def take(data: bytes, raw: bytes, now: int) -> bytes:
            if is_message_output(data):
                meter.output(now)
            elif carries_measures(data):  # message_start's usage, or message_delta's
                return self._measured(exchange, loads(data) or {}, raw, now)
            return raw

        error = await pump_events(exchange, response, self.settings.max_answer_bytes, take, forward=True)
        await end_stream(exchange, error, error_event)

    async def error(self, exchange: Exchange, response: Response) -> None:
        """The engine's 4xx/5xx with its body as it wrote it: an Anthropic client reads Anthropic's error shape,
        where the chat routes' OpenAI shape would lose its type."""
        raw = await error_body(response, self.settings.upstream_inter_token_timeout_s, ERROR_BODY_LIMIT + 1)
        headers = response_headers(response)
        if len(raw) > ERROR_BODY_LIMIT:  # not cut into JSON that does not parse: said in the same shape
            raw = dumps(_error_body("api_error", f"the engine's error body is larger than {ERROR_BODY_LIMIT} bytes"))
            headers = [(name, value) for name, value in headers if name != b"content-type"]
            headers.append((b"content-type", b"application/json"))
        exchange.status = response.status
        await send_whole(exchange, response.status, headers, raw)

    def _measured(self, exchange: Exchange, event: dict[str, Any], raw: bytes, now: int) -> bytes:
        """An event with usage, read: `message_start`'s (the prompt's count) kept, `message_delta`'s (the output's,
        at the end) ends the answer's measures and goes to the client with `performance`."""
        kind = event.get("type")
        if kind == "message_start" and isinstance(message := event.get("message"), dict):
            usage = message.get("usage")
            exchange.usage = usage if isinstance(usage, dict) else None
            exchange.final_events = (message,)  # its id, for the trace
            return raw
        usage = event.get("usage")
        if kind != "message_delta" or not isinstance(usage, dict) or exchange.performance is not None:
            return raw
        exchange.usage = (exchange.usage or {}) | usage  # the output's count, and vLLM's prompt count again
        exchange.final_events = (*exchange.final_events[:1], event)  # its stop reason
        event["usage"] = usage | {"performance": self.recorder.finish(exchange, now)}
        named = b"event: message_delta\n" if raw.startswith(b"event:") else b""
        return named + b"data: " + dumps(event) + b"\n\n"


def _error_body(error_type: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type, "message": message}}


def error_event(error: SidecarError) -> bytes:
    """The event that ends a stream cut short, in Anthropic's shape: a timeout's type for the sidecar's 504."""
    error_type = "timeout_error" if error.status_code == 504 else "api_error"
    return b"event: error\ndata: " + dumps(_error_body(error_type, error.message)) + b"\n\n"
