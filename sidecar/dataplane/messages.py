"""Anthropic's Messages API (`POST /v1/messages`, which vLLM, SGLang and llama-server serve beside OpenAI's), relayed
and measured.

A stream's events pass through as the engine wrote them, each as soon as it is read. An event is output when it is
a content block's delta with a non-empty text, thinking or tool input, or a tool call's start
(`chunks.is_message_output`): TTFT, ITL and latency are timed on those. The prompt's tokens come in
`message_start`'s usage, the output's in `message_delta`'s, the event that ends the answer: it is the only one
re-serialized, its usage given `performance`. There is no `[DONE]`: `message_stop` and the engine's body end it.

A non-streaming request without tools is streamed from the engine, for its TTFT, and answered with the message its
events build (`MessageAssembler`, as the Anthropic SDK builds one): the engine's own whole answer. One with tools goes
as it is, answered as the engine wrote it with `usage.performance` added (`Relays.whole`), its TTFT unmeasured: an
engine may stream a tool call it refuses unstreamed (vLLM's named tool), and the answer must be its own. The engine's
errors keep its shape (Anthropic's, which an Anthropic client reads), and a stream cut short ends with Anthropic's
`error` event, which the Anthropic SDK raises: it passes over an event without a name, as the OpenAI shape's is.
"""

from __future__ import annotations

import json
import time
from typing import Any

from sidecar.dataplane.answers import end_stream, error_body, send_assembled, start_stream
from sidecar.dataplane.chunks import carries_measures, is_message_output
from sidecar.dataplane.event_streams import pump_events
from sidecar.dataplane.exchange import (
    ERROR_BODY_LIMIT,
    Exchange,
    dumps,
    loads,
    response_headers,
    send_json,
    send_whole,
)
from sidecar.dataplane.recording import Recorder
from sidecar.dataplane.upstream import Response
from sidecar.errors import BadGateway, SidecarError
from sidecar.settings import Settings
from sidecar.telemetry.records import Performance


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
                event = loads(data) or {}
                if (performance := self._measure(exchange, event, now)) is not None:
                    event["usage"] = event["usage"] | {"performance": performance}
                    named = b"event: message_delta\n" if raw.startswith(b"event:") else b""
                    return named + b"data: " + dumps(event) + b"\n\n"
            return raw

        error = await pump_events(exchange, response, self.settings.max_answer_bytes, take, forward=True)
        await end_stream(exchange, error, error_event)

    async def assembled(self, exchange: Exchange, response: Response) -> None:
        """A non-streaming request streamed from the engine: answered with the message its events build, or with the
        error event it ended with (status 500, as the engine answers an error it meets mid-answer)."""
        meter = exchange.meter
        message = MessageAssembler()

        def take(data: bytes, raw: bytes, now: int) -> bytes:
            if is_message_output(data):
                meter.output(now)
            event = loads(data) or {}  # {}: not a JSON object, passed over
            message.add(event)
            self._measure(exchange, event, now)
            return raw

        cut = await pump_events(exchange, response, self.settings.max_answer_bytes, take, forward=False)
        if cut is not None:
            try:
                raise cut
            finally:
                del cut  # its traceback holds this frame: a name left for it here would be a reference cycle
        now = time.perf_counter_ns()
        if message.error is not None:  # in Anthropic's shape, as the engine wrote it
            await send_json(exchange, response, 500, message.error)
        elif message.message is None:
            raise BadGateway("the engine's stream ended before its message began")
        else:
            exchange.status = response.status
            built = message.result()
            if exchange.engine.adapter.whole_message == "omit_nulls":
                built = _without_nulls(built)
            await send_assembled(self.recorder, exchange, response, built, now)

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

    def _measure(self, exchange: Exchange, event: dict[str, Any], now: int) -> Performance | None:
        """An event with usage, read: `message_start`'s (the prompt's count) kept; `message_delta`'s (the output's,
        at the end) ends the answer's measures: their `performance`, for the stream's client (else None)."""
        kind = event.get("type")
        if kind == "message_start" and isinstance(message := event.get("message"), dict):
            usage = message.get("usage")
            exchange.usage = usage if isinstance(usage, dict) else None
            exchange.final_events = (message,)  # its id, for the trace
            return None
        usage = event.get("usage")
        if kind != "message_delta" or not isinstance(usage, dict) or exchange.performance is not None:
            return None
        exchange.usage = (exchange.usage or {}) | usage  # the output's count, and vLLM's prompt count again
        exchange.final_events = (*exchange.final_events[:1], event)  # its stop reason
        return self.recorder.finish(exchange, now)


class MessageAssembler:
    """A Messages API stream's events in, the message they build out, as the Anthropic SDK builds it: `message_start`'s
    message, each content block from its start with its deltas added (text, thinking and its signature, a tool's
    input from its JSON fragments, citations), the stop reason and usage of `message_delta`."""

    def __init__(self) -> None:
        self.message: dict[str, Any] | None = None
        self.blocks: dict[int, dict[str, Any]] = {}
        self.parts: dict[int, list[str]] = {}  # each block's text, thinking or input JSON, joined once at its end
        self.error: bytes | None = None  # the error event that ended the stream, as the engine wrote it

    def add(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "message_start" and isinstance(event.get("message"), dict):
            self.message = dict(event["message"])
        elif kind == "content_block_start" and isinstance(event.get("content_block"), dict):
            self.blocks[event.get("index", len(self.blocks))] = dict(event["content_block"])
        elif kind == "content_block_delta" and isinstance(delta := event.get("delta"), dict):
            self._delta(event.get("index", 0), delta)
        elif kind == "message_delta" and self.message is not None:
            if isinstance(delta := event.get("delta"), dict):
                self.message |= delta
            if isinstance(usage := event.get("usage"), dict):
                self.message["usage"] = (self.message.get("usage") or {}) | usage
        elif kind == "error" and self.error is None:
            self.error = dumps(event)

    def _delta(self, index: int, delta: dict[str, Any]) -> None:
        block = self.blocks.setdefault(index, {})
        kind = delta.get("type")
        if kind == "signature_delta":
            block["signature"] = delta.get("signature")
        elif kind == "citations_delta":
            block.setdefault("citations", []).append(delta.get("citation"))
        else:
            for key in ("text", "thinking", "partial_json"):
                if isinstance(delta.get(key), str):
                    self.parts.setdefault(index, []).append(delta[key])

    def result(self) -> dict[str, Any]:
        assert self.message is not None
        for index, parts in self.parts.items():
            block = self.blocks[index]
            joined = "".join(parts)
            if block.get("type") in ("tool_use", "server_tool_use"):
                try:
                    block["input"] = json.loads(joined) if joined else block.get("input", {})
                except ValueError:  # not JSON after all: what the engine sent, not an error of the sidecar's
                    block["input"] = joined
            else:
                field = "thinking" if block.get("type") == "thinking" else "text"
                block[field] = block.get(field, "") + joined
        return self.message | {"content": [self.blocks[index] for index in sorted(self.blocks)]}


def _without_nulls(value: Any) -> Any:
    """`value` with every null field left out, at any depth, as vLLM writes a whole message."""
    if isinstance(value, dict):
        return {key: _without_nulls(field) for key, field in value.items() if field is not None}
    if isinstance(value, list):
        return [_without_nulls(item) for item in value]
    return value


def _error_body(error_type: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type, "message": message}}


def error_event(error: SidecarError) -> bytes:
    """The event that ends a stream cut short, in Anthropic's shape: a timeout's type for the sidecar's 504."""
    error_type = "timeout_error" if error.status_code == 504 else "api_error"
    return b"event: error\ndata: " + dumps(_error_body(error_type, error.message)) + b"\n\n"
