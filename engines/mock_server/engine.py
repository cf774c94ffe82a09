"""The mock engine's generation: chat and text completions (streamed or not), embeddings, models, as vLLM answers
them, at the pace its configuration or a request's `mock` field sets, with the faults a request asks for."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from engines.mock_server import generation as gen
from engines.mock_server.answer import (
    MID_ANSWER_ERROR,
    TIMINGS,
    Answer,
    MockConfig,
    Pace,
    Stats,
    error_response,
    json_object,
    output_line,
    sse,
    stream_choice,
    tool_call,
)
from engines.mock_server.gpu import GpuMemory


class Dropped(Exception):
    """Raised in a stream to drop its connection (`drop_after`)."""


class DroppableStream(StreamingResponse):
    """A stream whose answer can be cut: its connection dropped mid-body, as an engine's HTTP layer does when it
    fails after the status went out (uvicorn closes a connection whose app returns with its answer incomplete)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        with contextlib.suppress(Dropped):
            await super().__call__(scope, receive, send)


class MockEngine:
    def __init__(self, config: MockConfig) -> None:
        self.config = config
        self.stats = Stats()
        self.gpu = GpuMemory()
        self.slots = asyncio.Semaphore(config.max_num_seqs) if config.max_num_seqs else None
        self.asleep: list[int] = []  # the level while sleeping
        self.adapters: dict[str, str] = {}  # LoRA name -> path

    async def admitted(self) -> bool:
        """Wait for a slot, as vLLM's scheduler makes a request wait; True when one was taken (release it)."""
        if self.slots is None:
            return False
        self.stats.waiting += 1
        try:
            await self.slots.acquire()
        finally:
            self.stats.waiting -= 1
        return True

    async def generate(self, request: Request) -> Response:
        received_ns = time.perf_counter_ns()
        self.stats.last_headers = dict(request.headers)
        body = await json_object(request)
        if isinstance(body, Response):
            return body
        chat = request.url.path.endswith("/chat/completions")
        overrides: dict[str, Any] = body["mock"] if isinstance(body.get("mock"), dict) else {}
        if isinstance(overrides.get("error"), dict):
            error = overrides["error"]
            return error_response(
                str(error.get("message", "mock error")), int(error.get("status", 400)), error.get("shape", "")
            )
        config_tokens = int(overrides.get("tokens", self.config.tokens))
        if chat and not isinstance(body.get("messages"), list):
            return error_response("'messages' is required")
        n = body.get("n") or 1
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or config_tokens
        if not isinstance(n, int) or not isinstance(max_tokens, int) or n < 1 or max_tokens < 1:
            return error_response("'n' and 'max_tokens' must be positive integers")
        count = min(config_tokens, max_tokens)
        finish = "length" if max_tokens < config_tokens else "stop"
        want_logprobs = bool(body.get("logprobs")) if chat else body.get("logprobs") is not None
        asked = body.get("prompt_logprobs")
        if asked is not None and (not isinstance(asked, int) or isinstance(asked, bool) or asked < -1):
            return error_response("'prompt_logprobs' must be an integer, -1 or more")
        if body.get("stream") and asked is not None and asked != 0:  # vLLM's own checks, and its words
            return error_response("`prompt_logprobs` are not available when `stream=True`.")
        if body.get("stream_options") and not body.get("stream"):
            return error_response("Stream options can only be defined when `stream=True`.")
        if body.get("stream") and body.get("use_beam_search") and not chat:
            return error_response("Streaming is not currently supported with beam search")
        top_k = int(body.get("top_logprobs") or 0) if chat else int(body.get("logprobs") or 0)
        choices = [gen.tokens_for(body, i, count, top_k) for i in range(n)]
        tool = gen.tool_call_pieces(body, choices[0]) if chat else None
        if tool is not None:
            finish = "tool_calls"
        completion_tokens = len(choices) * (len(tool[1]) if tool else count)
        usage = {
            "prompt_tokens": gen.count_prompt_tokens(body),
            "completion_tokens": completion_tokens,
            "total_tokens": gen.count_prompt_tokens(body) + completion_tokens,
        }
        # As vLLM does, the id carries the caller's X-Request-ID when there is one.
        request_id = request.headers.get("x-request-id") or f"mock-{next(self.stats.ids)}"
        base = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{request_id}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.config.model,
        }
        pace = Pace.of(self.config, overrides)
        prompt_logprobs = gen.prompt_logprobs(body) if asked is not None else None  # 0: no others, as vLLM
        kv_transfer = isinstance(body.get("kv_transfer_params"), dict)
        answer = Answer(
            base, chat, choices, tool, finish, want_logprobs, usage, pace, received_ns, prompt_logprobs, kv_transfer
        )
        self.stats.started += 1
        if "log" in overrides:  # a line of output, as an engine logs its requests (tests of the live log)
            output_line(str(overrides["log"]), repeat=int(overrides.get("log_repeat", 1)))
        headers = {"x-compute-time": "0.0805"} if answer.pace.timings else None
        if body.get("stream"):
            # `"stream_usage": false` ignores stream_options, as llama-cpp-python's server does.
            options = body.get("stream_options") or {}
            include_usage = bool(options.get("include_usage")) and overrides.get("stream_usage", True) is not False
            # As vLLM: usage in every chunk too, which only counts with include_usage.
            continuous = include_usage and bool(options.get("continuous_usage_stats"))
            stream = self._stream(answer, include_usage, continuous)
            return DroppableStream(stream, media_type="text/event-stream", headers=headers)
        return await self._complete(request, answer, headers)

    async def _stream(self, answer: Answer, include_usage: bool, continuous: bool) -> AsyncIterator[bytes]:
        base, chat, choices, tool = answer.base, answer.chat, answer.choices, answer.tool
        prompt_tokens = answer.usage["prompt_tokens"]

        def chunk(choice: dict[str, Any], completion_tokens: int, **extra: Any) -> bytes:
            """One choice's event; with continuous usage, that choice's tokens so far, as vLLM counts them."""
            payload = {**base, "choices": [choice], **extra}
            if continuous:
                tokens = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
                payload["usage"] = tokens | {"total_tokens": prompt_tokens + completion_tokens}
            return sse(payload)

        async with self.streaming():
            if chat:  # the role arrives before any output, as vLLM sends it
                for i in range(len(choices)):
                    delta = {"role": "assistant", "content": ""}
                    yield chunk({"index": i, "delta": delta, "logprobs": None, "finish_reason": None}, 0)
            pace = answer.pace
            outputs_ms = self.stats.timed(base["id"])
            block = self.gpu.hold(pace.gpu_mb) if pace.gpu_mb else None
            await asyncio.sleep(pace.ttft_s)
            for step in range(answer.steps):
                if step == pace.die_after:
                    os._exit(3)
                if step == pace.stall_after:
                    await asyncio.Event().wait()
                if step == pace.drop_after:
                    raise Dropped
                if step == pace.error_after:  # vLLM's error event, then the stream's end
                    yield sse({"error": MID_ANSWER_ERROR})
                    yield b"data: [DONE]\n\n"
                    return
                if step:
                    await asyncio.sleep(pace.itl_s)
                outputs_ms.append((time.perf_counter_ns() - answer.received_ns) / 1e6)
                for i, tokens in enumerate(choices):
                    yield chunk(stream_choice(chat, i, tokens, step, tool, answer.want_logprobs), step + 1)
            if block is not None:
                self.gpu.release(block)  # before the answer ends: the request's memory is back when it completes
            for i in range(len(choices)):
                last: dict[str, Any] = {"index": i, "logprobs": None, "finish_reason": answer.finish}
                if chat:
                    last["delta"] = {}
                else:
                    last["text"] = ""
                if pace.timings and i == len(choices) - 1:  # llama.cpp puts its timings on the last chunk
                    yield chunk(last, answer.steps, timings=TIMINGS)
                else:
                    yield chunk(last, answer.steps)
            if include_usage:
                yield sse({**base, "choices": [], "usage": answer.usage})
            yield b"data: [DONE]\n\n"

    @contextlib.asynccontextmanager
    async def streaming(self) -> AsyncIterator[None]:
        """One streamed answer: in flight, and holding a slot where there are `max_num_seqs`, until it ends;
        counted as completed, or as cancelled when its client leaves."""
        self.stats.in_flight += 1
        slot = False
        try:
            slot = await self.admitted()
            yield
            self.stats.completed += 1
        except (asyncio.CancelledError, GeneratorExit):
            self.stats.cancelled += 1
            raise
        finally:
            self.stats.in_flight -= 1
            if slot and self.slots is not None:
                self.slots.release()

    async def generated_whole(self, request: Request, pace: Pace, steps: int) -> bool:
        """One answer generated whole, in flight meanwhile: True once done (counted completed), False when its
        client left first, which aborts the generation as vLLM's non-streaming routes do (counted cancelled)."""
        self.stats.in_flight += 1
        generating = asyncio.create_task(self._generate_whole(pace, steps))
        watching = asyncio.create_task(self._until_disconnected(request))
        try:
            await asyncio.wait({generating, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.stats.in_flight -= 1
            watching.cancel()
            generating.cancel()
        if not generating.done() or generating.cancelled():
            self.stats.cancelled += 1
            return False
        self.stats.completed += 1
        return True

    async def _generate_whole(self, pace: Pace, steps: int) -> None:
        slot = await self.admitted()
        try:
            if pace.die_after is not None:
                os._exit(3)
            await asyncio.sleep(pace.ttft_s + pace.itl_s * max(0, steps - 1))
            if pace.stall_after is not None:
                await asyncio.Event().wait()
        finally:
            if slot and self.slots is not None:
                self.slots.release()

    async def _until_disconnected(self, request: Request) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def _complete(self, request: Request, answer: Answer, headers: dict[str, str] | None) -> Response:
        chat, tool, finish, want_logprobs = answer.chat, answer.tool, answer.finish, answer.want_logprobs
        pace = answer.pace
        if not await self.generated_whole(request, pace, answer.steps):
            return Response(status_code=499)
        if pace.error_after is not None and pace.error_after < answer.steps:
            return JSONResponse(MID_ANSWER_ERROR, status_code=500)
        result = []
        for i, tokens in enumerate(answer.choices):
            text = "".join(t.text for t in tokens)
            if chat:
                message: dict[str, Any] = {"role": "assistant", "content": text}
                if tool:
                    message = {"role": "assistant", "content": None, "tool_calls": [tool_call(i, tool, full=True)]}
                logprobs = gen.chat_logprobs(tokens) if want_logprobs and not tool else None
                result.append({"index": i, "message": message, "logprobs": logprobs, "finish_reason": finish})
            else:
                logprobs = gen.completion_logprobs(tokens) if want_logprobs else None
                result.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish})
                if answer.prompt_logprobs is not None:  # vLLM: a completion's in each choice, a chat's beside them
                    result[-1]["prompt_logprobs"] = answer.prompt_logprobs
        object_name = "chat.completion" if chat else "text_completion"
        body = {**answer.base, "object": object_name, "choices": result, "usage": answer.usage}
        if chat and answer.prompt_logprobs is not None:
            body["prompt_logprobs"] = answer.prompt_logprobs
        if answer.kv_transfer:  # vLLM's disaggregated prefill: the decode side's parameters, in a whole answer only
            body["kv_transfer_params"] = {
                "do_remote_prefill": True,
                "remote_engine_id": "mock",
                "remote_block_ids": [0],
            }
        if pace.timings:
            body["timings"] = TIMINGS
        return JSONResponse(body, headers=headers)

    async def embeddings(self, request: Request) -> Response:
        body = await request.json()
        inputs = body.get("input")
        inputs = inputs if isinstance(inputs, list) else [inputs]
        dimensions = body.get("dimensions") or 8  # OpenAI's field, as vLLM takes it for a Matryoshka model
        data = [
            {"object": "embedding", "index": i, "embedding": gen.embedding(str(x), dimensions)}
            for i, x in enumerate(inputs)
        ]
        tokens = sum(len(str(x).split()) for x in inputs)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return JSONResponse({"object": "list", "data": data, "model": self.config.model, "usage": usage})

    def model_cards(self) -> list[dict[str, Any]]:
        card = {"id": self.config.model, "object": "model", "created": 0, "owned_by": "mock", "root": self.config.model}
        loras = [card | {"id": name, "root": path, "parent": self.config.model} for name, path in self.adapters.items()]
        return [card | {"parent": None}, *loras]

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": self.model_cards()})

    async def model(self, request: Request) -> Response:
        """One model's card, as OpenAI's retrieve-model answers; a 404 in vLLM's error shape for another name."""
        model_id = request.path_params["model_id"]
        for card in self.model_cards():
            if card["id"] == model_id:
                return JSONResponse(card)
        body = {"object": "error", "message": f"The model `{model_id}` does not exist.", "type": "NotFoundError"}
        return JSONResponse(body | {"param": "model", "code": 404}, status_code=404)
