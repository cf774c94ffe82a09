"""The mock engine's Anthropic Messages API (`POST /v1/messages`) as vLLM answers it: one assistant text block, whole
or streamed as Anthropic's events (`message_start` with the prompt's usage, `content_block_start`, a
`content_block_delta` a token, `content_block_stop`, `message_delta` with the stop reason and the usage,
`message_stop`; no `[DONE]`), its errors in Anthropic's shape. The pace and the `mock` overrides (`tokens`,
`ttft_ms`, `itl_ms`, `stall_after`, `drop_after`, `log`) are the chat routes'."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from engines.mock_server import generation as gen
from engines.mock_server.answer import Pace, output_line
from engines.mock_server.engine import DroppableStream, Dropped, MockEngine


def _event(payload: dict[str, Any]) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (payload["type"].encode(), json.dumps(payload, separators=(",", ":")).encode())


def anthropic_error(message: str, status: int = 400) -> Response:
    """An error as vLLM's Messages routes shape it: Anthropic's."""
    body = {"type": "error", "error": {"type": "invalid_request_error", "message": message}}
    return JSONResponse(body, status_code=status)


class _Reply:
    """One request's answer: its id, its text in tokens, why it stopped, and its usage."""

    def __init__(self, engine: MockEngine, request: Request, body: dict[str, Any]) -> None:
        self.received_ns = time.perf_counter_ns()
        overrides: dict[str, Any] = body["mock"] if isinstance(body.get("mock"), dict) else {}
        self.overrides = overrides
        config_tokens = int(overrides.get("tokens", engine.config.tokens))
        limit = body["max_tokens"]
        self.tokens = [token.text for token in gen.tokens_for(body, 0, min(config_tokens, limit), 0)]
        self.stop_reason = "max_tokens" if limit < config_tokens else "end_turn"
        self.pace = Pace.of(engine.config, overrides)
        request_id = request.headers.get("x-request-id") or f"mock-{next(engine.stats.ids)}"
        self.id = f"chatcmpl-{request_id}"  # vLLM names a message after its request
        self.model = engine.config.model
        self.input_tokens = gen.count_prompt_tokens(body)

    def message(self, content: list[dict[str, Any]], stop_reason: str | None, output_tokens: int) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "content": content,
            "model": self.model,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": {"input_tokens": self.input_tokens, "output_tokens": output_tokens},
        }


async def respond(engine: MockEngine, request: Request) -> Response:
    try:
        body = await request.json()
    except ValueError:
        return anthropic_error("invalid JSON")
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        return anthropic_error("'messages' must be a list")
    limit = body.get("max_tokens")
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        return anthropic_error("'max_tokens' must be a positive integer")
    try:
        reply = _Reply(engine, request, body)
    except (TypeError, ValueError) as exc:
        return anthropic_error(f"bad 'mock' overrides: {exc}")
    engine.stats.started += 1
    if "log" in reply.overrides:
        output_line(str(reply.overrides["log"]))
    if body.get("stream"):
        return DroppableStream(_stream(engine, reply), media_type="text/event-stream")
    if not await engine.generated_whole(request, reply.pace, len(reply.tokens)):
        return Response(status_code=499)
    text = [{"type": "text", "text": "".join(reply.tokens)}]
    message = reply.message(text, reply.stop_reason, len(reply.tokens))
    return JSONResponse({key: value for key, value in message.items() if value is not None})  # vLLM's: no nulls


async def _stream(engine: MockEngine, reply: _Reply) -> AsyncIterator[bytes]:
    pace = reply.pace
    async with engine.streaming():
        yield _event({"type": "message_start", "message": reply.message([], None, 0)})
        yield _event({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
        outputs_ms = engine.stats.timed(reply.id)
        await asyncio.sleep(pace.ttft_s)
        for step, token in enumerate(reply.tokens):
            if step == pace.stall_after:
                await asyncio.Event().wait()
            if step == pace.drop_after:
                raise Dropped
            if step:
                await asyncio.sleep(pace.itl_s)
            outputs_ms.append((time.perf_counter_ns() - reply.received_ns) / 1e6)
            delta = {"type": "text_delta", "text": token}
            yield _event({"type": "content_block_delta", "index": 0, "delta": delta})
        yield _event({"type": "content_block_stop", "index": 0})
        usage = {"input_tokens": reply.input_tokens, "output_tokens": len(reply.tokens)}
        stop = {"stop_reason": reply.stop_reason, "stop_sequence": None}
        yield _event({"type": "message_delta", "delta": stop, "usage": usage})
        yield _event({"type": "message_stop"})
