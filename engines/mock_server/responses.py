"""The mock engine's Responses API (`POST /v1/responses`) as vLLM answers it: one assistant message of text, whole
or streamed as semantic events (`event:` and `data:` lines, a `sequence_number` each, no `[DONE]`: the stream ends
with `response.completed`), its usage in input and output tokens. A `background` request that does not stream is
answered at once with the response `queued`, as vLLM answers it (there is no store to poll it from here). The pace
and the `mock` overrides (`tokens`, `ttft_ms`, `itl_ms`, `stall_after`, `log`) are the chat routes'."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from engines.mock_server import generation as gen
from engines.mock_server.answer import Pace, error_response, json_object, output_line
from engines.mock_server.engine import MockEngine


def _event(payload: dict[str, Any]) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (payload["type"].encode(), json.dumps(payload, separators=(",", ":")).encode())


class _Reply:
    """One request's answer: its id, text in tokens, usage, and the response object at each stage."""

    def __init__(self, engine: MockEngine, request: Request, body: dict[str, Any]) -> None:
        self.received_ns = time.perf_counter_ns()
        given = body["input"]
        text = given if isinstance(given, str) else " ".join(str(item.get("content", "")) for item in given)
        prompt = {"prompt": text}
        overrides: dict[str, Any] = body["mock"] if isinstance(body.get("mock"), dict) else {}
        self.overrides = overrides
        config_tokens = int(overrides.get("tokens", engine.config.tokens))
        limit = body.get("max_output_tokens") or config_tokens
        self.tokens = [token.text for token in gen.tokens_for(prompt, 0, min(config_tokens, limit), 0)]
        self.status = "incomplete" if limit < config_tokens else "completed"
        self.pace = Pace.of(engine.config, overrides)
        request_id = request.headers.get("x-request-id") or f"mock-{next(engine.stats.ids)}"
        self.id = f"resp_{request_id}"
        self.item_id = f"msg_{request_id}"
        self.model = engine.config.model
        input_tokens = gen.count_prompt_tokens(prompt)
        self.usage = {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": len(self.tokens),
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + len(self.tokens),
        }
        self.sequence = 0

    def message(self, status: str, text: str | None) -> dict[str, Any]:
        content = [] if text is None else [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
        return {"id": self.item_id, "type": "message", "role": "assistant", "status": status, "content": content}

    def response(self, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None) -> dict[str, Any]:
        details = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {
            "id": self.id,
            "object": "response",
            "created_at": int(time.time()),
            "model": self.model,
            "status": status,
            "output": output,
            "usage": usage,
            "error": None,
            "incomplete_details": details,
            "instructions": None,
            "metadata": {},
            "parallel_tool_calls": True,
            "temperature": 1.0,
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0,
        }

    def event(self, kind: str, **fields: Any) -> bytes:
        self.sequence += 1
        return _event({"type": f"response.{kind}", "sequence_number": self.sequence - 1, **fields})


async def respond(engine: MockEngine, request: Request) -> Response:
    body = await json_object(request)
    if isinstance(body, Response):
        return body
    given = body.get("input")
    if not (isinstance(given, str) or isinstance(given, list) and all(isinstance(item, dict) for item in given)):
        return error_response("'input' must be a string or a list of input items")
    limit = body.get("max_output_tokens")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        return error_response("'max_output_tokens' must be a positive integer")
    try:
        reply = _Reply(engine, request, body)
    except (TypeError, ValueError) as exc:
        return error_response(f"bad 'mock' overrides: {exc}")
    if body.get("background") and not body.get("stream"):  # vLLM's answer at once; this mock keeps no store
        return JSONResponse(reply.response("queued", [], None))
    engine.stats.started += 1
    if "log" in reply.overrides:
        output_line(str(reply.overrides["log"]))
    if body.get("stream"):
        return StreamingResponse(_stream(engine, reply), media_type="text/event-stream")
    if not await engine.generated_whole(request, reply.pace, len(reply.tokens)):
        return Response(status_code=499)
    text = "".join(reply.tokens)
    return JSONResponse(reply.response(reply.status, [reply.message("completed", text)], reply.usage))


async def _stream(engine: MockEngine, reply: _Reply) -> AsyncIterator[bytes]:
    async with engine.streaming():
        yield reply.event("created", response=reply.response("in_progress", [], None))
        yield reply.event("in_progress", response=reply.response("in_progress", [], None))
        yield reply.event("output_item.added", output_index=0, item=reply.message("in_progress", None))
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        where = {"item_id": reply.item_id, "output_index": 0, "content_index": 0}
        yield reply.event("content_part.added", **where, part=part)
        outputs_ms = engine.stats.timed(reply.id)
        await asyncio.sleep(reply.pace.ttft_s)
        for step, token in enumerate(reply.tokens):
            if step == reply.pace.stall_after:
                await asyncio.Event().wait()
            if step:
                await asyncio.sleep(reply.pace.itl_s)
            outputs_ms.append((time.perf_counter_ns() - reply.received_ns) / 1e6)
            yield reply.event("output_text.delta", **where, delta=token, logprobs=[])
        text = "".join(reply.tokens)
        yield reply.event("output_text.done", **where, text=text, logprobs=[])
        yield reply.event("content_part.done", **where, part=part | {"text": text})
        done = reply.message("completed", text)
        yield reply.event("output_item.done", output_index=0, item=done)
        yield reply.event(reply.status, response=reply.response(reply.status, [done], reply.usage))
