"""The mock engine's OpenAI routes: chat and text completions (streamed or not), embeddings, models, health."""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from engines.mock_server import generation as gen
from engines.mock_server.gpu import GpuMemory


@dataclass
class MockConfig:
    model: str = "mock-model"
    ttft_s: float = 0.02
    itl_s: float = 0.005
    tokens: int = 16
    api_key: str | None = None  # as vLLM's --api-key: /v1 routes need `Authorization: Bearer <key>`
    max_num_seqs: int | None = None  # as vLLM's: at most this many requests generate, the rest wait (None: all run)
    sleep_mode: bool = False  # vLLM's /sleep, /wake_up and /is_sleeping
    runtime_lora: bool = False  # vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter
    weights: GpuMemory | None = None  # the GPU memory held at start (--gpu-mb): what sleep frees and wake takes back
    weights_mb: float = 0.0


@dataclass
class Stats:
    started: int = 0
    completed: int = 0
    cancelled: int = 0
    in_flight: int = 0
    waiting: int = 0  # of those in flight, waiting for one of the max_num_seqs slots
    ids: itertools.count[int] = field(default_factory=itertools.count)
    # The engine's own clock for its recent answers, by their id: when each output step was written, in ms from
    # the request's arrival. Tests compare the sidecar's measurements with these rather than with a fixed window.
    outputs_ms: dict[str, list[float]] = field(default_factory=dict)
    last_headers: dict[str, str] = field(default_factory=dict)  # of the last generation request: what reached it

    def timed(self, answer_id: str) -> list[float]:
        if len(self.outputs_ms) >= 256:
            del self.outputs_ms[next(iter(self.outputs_ms))]
        times: list[float] = []
        self.outputs_ms[answer_id] = times
        return times


@dataclass(frozen=True)
class Pace:
    """How the answer is delivered: the engine's delays, or a request's `mock` overrides, and faults to inject."""

    ttft_s: float
    itl_s: float
    die_after: int | None = None  # the process exits after this many output steps (an engine crash)
    stall_after: int | None = None  # it sends nothing more after this many steps (a hung engine)
    timings: bool = False  # report llama.cpp-style `timings` and TGI-style `x-compute-time`
    gpu_mb: float = 0.0  # GPU memory held from the first token to the last (needs PyTorch and a GPU)

    @classmethod
    def of(cls, config: MockConfig, overrides: dict[str, Any]) -> Pace:
        return cls(
            ttft_s=float(overrides.get("ttft_ms", config.ttft_s * 1000)) / 1000,
            itl_s=float(overrides.get("itl_ms", config.itl_s * 1000)) / 1000,
            die_after=overrides.get("die_after"),
            stall_after=overrides.get("stall_after"),
            timings=bool(overrides.get("timings")),
            gpu_mb=float(overrides.get("gpu_mb", 0.0)),
        )


@dataclass(frozen=True)
class Answer:
    """What the mock will answer one request with, streamed or not."""

    base: dict[str, Any]  # id, object, created, model
    chat: bool
    choices: list[list[gen.Token]]
    tool: tuple[str, list[str]] | None  # the function called and its arguments in pieces
    finish: str
    want_logprobs: bool
    usage: dict[str, Any]
    pace: Pace
    received_ns: int  # the engine's clock when the request arrived

    @property
    def steps(self) -> int:
        """Output events per choice: one per token, or one per piece of the tool call's arguments."""
        return len(self.tool[1]) if self.tool else len(self.choices[0])


def _output(line: str) -> None:
    """A line of the engine's output, as engines write theirs: plain, on stdout, at once."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _error(message: str, status: int = 400, shape: str = "vllm") -> Response:
    """An error as engines shape them: vLLM's (flat, int code), TGI's, or plain text."""
    if shape == "tgi":
        return JSONResponse({"error": message, "error_type": "validation"}, status_code=status)
    if shape == "text":
        return Response(message, status_code=status, media_type="text/plain")
    body = {"object": "error", "message": message, "type": "BadRequestError", "param": None, "code": status}
    return JSONResponse(body, status_code=status)


TIMINGS = {"prompt_n": 4, "prompt_ms": 1.25, "predicted_n": 16, "predicted_ms": 80.5}


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def create_app(config: MockConfig) -> Starlette:
    stats = Stats()
    gpu = GpuMemory()
    slots = asyncio.Semaphore(config.max_num_seqs) if config.max_num_seqs else None

    async def admitted() -> bool:
        """Wait for a slot, as vLLM's scheduler makes a request wait; True when one was taken (release it)."""
        if slots is None:
            return False
        stats.waiting += 1
        try:
            await slots.acquire()
        finally:
            stats.waiting -= 1
        return True

    async def generate(request: Request) -> Response:
        received_ns = time.perf_counter_ns()
        stats.last_headers = dict(request.headers)
        try:
            body = await request.json()
        except ValueError:
            return _error("invalid JSON")
        if not isinstance(body, dict):
            return _error("body must be an object")
        chat = request.url.path.endswith("/chat/completions")
        overrides: dict[str, Any] = body["mock"] if isinstance(body.get("mock"), dict) else {}
        if isinstance(overrides.get("error"), dict):
            error = overrides["error"]
            return _error(
                str(error.get("message", "mock error")), int(error.get("status", 400)), error.get("shape", "")
            )
        config_tokens = int(overrides.get("tokens", config.tokens))
        if chat and not isinstance(body.get("messages"), list):
            return _error("'messages' is required")
        n = body.get("n") or 1
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or config_tokens
        if not isinstance(n, int) or not isinstance(max_tokens, int) or n < 1 or max_tokens < 1:
            return _error("'n' and 'max_tokens' must be positive integers")
        count = min(config_tokens, max_tokens)
        finish = "length" if max_tokens < config_tokens else "stop"
        want_logprobs = bool(body.get("logprobs")) if chat else body.get("logprobs") is not None
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
        request_id = request.headers.get("x-request-id") or f"mock-{next(stats.ids)}"
        base = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{request_id}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": config.model,
        }
        pace = Pace.of(config, overrides)
        answer = Answer(base, chat, choices, tool, finish, want_logprobs, usage, pace, received_ns)
        stats.started += 1
        if "log" in overrides:  # a line of output, as an engine logs its requests (tests of the live log)
            _output(str(overrides["log"]))
        headers = {"x-compute-time": "0.0805"} if answer.pace.timings else None
        if body.get("stream"):
            # `"stream_usage": false` ignores stream_options, as llama-cpp-python's server does.
            options = body.get("stream_options") or {}
            include_usage = bool(options.get("include_usage")) and overrides.get("stream_usage", True) is not False
            # As vLLM: usage in every chunk too, which only counts with include_usage.
            continuous = include_usage and bool(options.get("continuous_usage_stats"))
            stream = _stream(answer, include_usage, continuous)
            return StreamingResponse(stream, media_type="text/event-stream", headers=headers)
        return await _complete(request, answer, headers)

    async def _stream(answer: Answer, include_usage: bool, continuous: bool) -> AsyncIterator[bytes]:
        base, chat, choices, tool = answer.base, answer.chat, answer.choices, answer.tool
        prompt_tokens = answer.usage["prompt_tokens"]

        def chunk(choice: dict[str, Any], completion_tokens: int, **extra: Any) -> bytes:
            """One choice's event; with continuous usage, that choice's tokens so far, as vLLM counts them."""
            payload = {**base, "choices": [choice], **extra}
            if continuous:
                tokens = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
                payload["usage"] = tokens | {"total_tokens": prompt_tokens + completion_tokens}
            return _sse(payload)

        stats.in_flight += 1
        slot = False
        try:
            slot = await admitted()
            if chat:  # the role arrives before any output, as vLLM sends it
                for i in range(len(choices)):
                    delta = {"role": "assistant", "content": ""}
                    yield chunk({"index": i, "delta": delta, "logprobs": None, "finish_reason": None}, 0)
            pace = answer.pace
            outputs_ms = stats.timed(base["id"])
            block = gpu.hold(pace.gpu_mb) if pace.gpu_mb else None
            await asyncio.sleep(pace.ttft_s)
            for step in range(answer.steps):
                if step == pace.die_after:
                    os._exit(3)
                if step == pace.stall_after:
                    await asyncio.Event().wait()
                if step:
                    await asyncio.sleep(pace.itl_s)
                outputs_ms.append((time.perf_counter_ns() - answer.received_ns) / 1e6)
                for i, tokens in enumerate(choices):
                    yield chunk(_stream_choice(chat, i, tokens, step, tool, answer.want_logprobs), step + 1)
            if block is not None:
                gpu.release(block)  # before the answer ends: the request's memory is back when it completes
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
                yield _sse({**base, "choices": [], "usage": answer.usage})
            yield b"data: [DONE]\n\n"
            stats.completed += 1
        except (asyncio.CancelledError, GeneratorExit):
            stats.cancelled += 1
            raise
        finally:
            stats.in_flight -= 1
            if slot and slots is not None:
                slots.release()

    async def _generate_whole(pace: Pace, steps: int) -> None:
        slot = await admitted()
        try:
            if pace.die_after is not None:
                os._exit(3)
            await asyncio.sleep(pace.ttft_s + pace.itl_s * max(0, steps - 1))
            if pace.stall_after is not None:
                await asyncio.Event().wait()
        finally:
            if slot and slots is not None:
                slots.release()

    async def _until_disconnected(request: Request) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def _complete(request: Request, answer: Answer, headers: dict[str, str] | None) -> Response:
        chat, tool, finish, want_logprobs = answer.chat, answer.tool, answer.finish, answer.want_logprobs
        pace = answer.pace
        stats.in_flight += 1
        # As vLLM's non-streaming routes do: a client that disconnects aborts the generation.
        generating = asyncio.create_task(_generate_whole(pace, answer.steps))
        watching = asyncio.create_task(_until_disconnected(request))
        try:
            await asyncio.wait({generating, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stats.in_flight -= 1
            watching.cancel()
            generating.cancel()
        if not generating.done() or generating.cancelled():
            stats.cancelled += 1
            return Response(status_code=499)
        result = []
        for i, tokens in enumerate(answer.choices):
            text = "".join(t.text for t in tokens)
            if chat:
                message: dict[str, Any] = {"role": "assistant", "content": text}
                if tool:
                    message = {"role": "assistant", "content": None, "tool_calls": [_tool_call(i, tool, full=True)]}
                logprobs = gen.chat_logprobs(tokens) if want_logprobs and not tool else None
                result.append({"index": i, "message": message, "logprobs": logprobs, "finish_reason": finish})
            else:
                logprobs = gen.completion_logprobs(tokens) if want_logprobs else None
                result.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish})
        stats.completed += 1
        object_name = "chat.completion" if chat else "text_completion"
        body = {**answer.base, "object": object_name, "choices": result, "usage": answer.usage}
        if pace.timings:
            body["timings"] = TIMINGS
        return JSONResponse(body, headers=headers)

    async def embeddings(request: Request) -> Response:
        body = await request.json()
        inputs = body.get("input")
        inputs = inputs if isinstance(inputs, list) else [inputs]
        data = [{"object": "embedding", "index": i, "embedding": gen.embedding(str(x))} for i, x in enumerate(inputs)]
        tokens = sum(len(str(x).split()) for x in inputs)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return JSONResponse({"object": "list", "data": data, "model": config.model, "usage": usage})

    def model_cards() -> list[dict[str, Any]]:
        card = {"id": config.model, "object": "model", "created": 0, "owned_by": "mock", "root": config.model}
        loras = [card | {"id": name, "root": path, "parent": config.model} for name, path in adapters.items()]
        return [card | {"parent": None}, *loras]

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": model_cards()})

    async def model(request: Request) -> Response:
        """One model's card, as OpenAI's retrieve-model answers; a 404 in vLLM's error shape for another name."""
        model_id = request.path_params["model_id"]
        for card in model_cards():
            if card["id"] == model_id:
                return JSONResponse(card)
        body = {"object": "error", "message": f"The model `{model_id}` does not exist.", "type": "NotFoundError"}
        return JSONResponse(body | {"param": "model", "code": 404}, status_code=404)

    # -- vLLM's sleep mode: the weights' GPU memory given back, then taken again ------------------------------

    async def sleep(request: Request) -> Response:
        level = int(request.query_params.get("level", "1"))
        if config.weights is not None and config.weights_mb and not asleep:
            config.weights.release_all()
        asleep[:] = [level]
        _output(f"mock engine: sleeping at level {level}")
        return Response(status_code=200)

    async def wake_up(request: Request) -> Response:
        if config.weights is not None and config.weights_mb and asleep:
            config.weights.hold(config.weights_mb)
        asleep.clear()
        _output("mock engine: awake")
        return Response(status_code=200)

    async def is_sleeping(request: Request) -> Response:
        return JSONResponse({"is_sleeping": bool(asleep)})

    # -- vLLM's runtime LoRA: adapters by name, from a folder on disk ----------------------------------------

    async def load_lora_adapter(request: Request) -> Response:
        body = await request.json()
        name, path = body.get("lora_name"), body.get("lora_path")
        if not name or not path:
            return _error("Both 'lora_name' and 'lora_path' must be provided.")
        if name in adapters:
            return _error(f"The lora adapter '{name}' has already been loaded.")
        if not os.path.isdir(path):
            return _error(f"Loading lora {name} failed: No adapter found for {path}", 404)
        adapters[name] = path
        return Response(f"Success: LoRA adapter '{name}' added successfully.", media_type="text/plain")

    async def unload_lora_adapter(request: Request) -> Response:
        name = (await request.json()).get("lora_name")
        if name not in adapters:
            return _error(f"The lora adapter '{name}' cannot be found.", 404)
        del adapters[name]
        return Response(f"Success: LoRA adapter '{name}' removed successfully.", media_type="text/plain")

    async def health(request: Request) -> Response:
        return Response(status_code=200)

    async def echo(request: Request) -> Response:
        """What reached the engine: for tests of what the proxy forwards."""
        body = (await request.body()).decode(errors="replace")
        return JSONResponse(
            {"method": request.method, "headers": dict(request.headers), "query": request.url.query, "body": body}
        )

    async def metrics(request: Request) -> Response:
        """Shaped as vLLM's /metrics: its load gauges among histogram lines, labelled as vLLM labels them."""
        labels = f'engine="0",model_name="{config.model}"'
        running = stats.in_flight - stats.waiting
        lines = [
            "# HELP vllm:num_requests_running Number of requests in model execution batches.",
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{{{labels}}} {float(running)}",
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{{{labels}}} {float(stats.waiting)}",
            "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
            "# TYPE vllm:kv_cache_usage_perc gauge",
            f"vllm:kv_cache_usage_perc{{{labels}}} {running / (config.max_num_seqs or 256)}",
            "# HELP vllm:request_success_total Count of successfully processed requests.",
            "# TYPE vllm:request_success_total counter",
            f'vllm:request_success_total{{{labels},finished_reason="stop"}} {float(stats.completed)}',
            "# TYPE vllm:e2e_request_latency_seconds histogram",
            *(f'vllm:e2e_request_latency_seconds_bucket{{{labels},le="{le}"}} 0.0' for le in ("0.3", "1.0", "+Inf")),
        ]
        return Response("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4; charset=utf-8")

    async def mock_stats(request: Request) -> Response:
        fields = ("started", "completed", "cancelled", "in_flight")
        return JSONResponse({name: getattr(stats, name) for name in fields})

    async def mock_last_headers(request: Request) -> Response:
        """The headers of the last chat or completion request: what a proxy in front forwarded."""
        return JSONResponse(stats.last_headers)

    async def mock_outputs(request: Request) -> Response:
        """When a recent streamed answer's output steps were written, by the engine's own clock."""
        times = stats.outputs_ms.get(request.path_params["answer_id"])
        return JSONResponse({"output_ms": times}, status_code=200 if times is not None else 404)

    asleep: list[int] = []  # the level while sleeping
    adapters: dict[str, str] = {}  # LoRA name -> path
    features = []
    if config.sleep_mode:
        features += [
            Route("/sleep", sleep, methods=["POST"]),
            Route("/wake_up", wake_up, methods=["POST"]),
            Route("/is_sleeping", is_sleeping, methods=["GET"]),
        ]
    if config.runtime_lora:
        features += [
            Route("/v1/load_lora_adapter", load_lora_adapter, methods=["POST"]),
            Route("/v1/unload_lora_adapter", unload_lora_adapter, methods=["POST"]),
        ]
    return Starlette(
        middleware=[Middleware(_KeyRequired, key=config.api_key)] if config.api_key else [],
        routes=[
            *features,
            Route("/v1/chat/completions", generate, methods=["POST"]),
            Route("/v1/completions", generate, methods=["POST"]),
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", model, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/mock/stats", mock_stats, methods=["GET"]),
            Route("/mock/outputs/{answer_id}", mock_outputs, methods=["GET"]),
            Route("/mock/last-headers", mock_last_headers, methods=["GET"]),
            Route("/v1/mock/echo", echo, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
        ],
    )


class _KeyRequired:
    """vLLM's answer to a /v1 request without its --api-key: 401 `{"error": "Unauthorized"}`."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        self.expected = f"Bearer {key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                await JSONResponse({"error": "Unauthorized"}, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _tool_call(index: int, tool: tuple[str, list[str]], full: bool, step: int = 0) -> dict[str, Any]:
    name, pieces = tool
    call: dict[str, Any] = {"index": 0, "id": f"call_mock_{index}", "type": "function"}
    if full:
        return {k: v for k, v in call.items() if k != "index"} | {
            "function": {"name": name, "arguments": "".join(pieces)}
        }
    if step == 0:
        return call | {"function": {"name": name, "arguments": pieces[0]}}
    return {"index": 0, "function": {"arguments": pieces[step]}}


def _stream_choice(
    chat: bool, index: int, tokens: list[gen.Token], step: int, tool: tuple[str, list[str]] | None, want_logprobs: bool
) -> dict[str, Any]:
    if chat and tool:
        delta: dict[str, Any] = {"tool_calls": [_tool_call(index, tool, full=False, step=step)]}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
    token = tokens[step]
    if chat:
        logprobs = gen.chat_logprobs([token]) if want_logprobs else None
        return {"index": index, "delta": {"content": token.text}, "logprobs": logprobs, "finish_reason": None}
    offset = sum(len(t.text) for t in tokens[:step])
    logprobs = gen.completion_logprobs([token], offset) if want_logprobs else None
    return {"index": index, "text": token.text, "logprobs": logprobs, "finish_reason": None}
