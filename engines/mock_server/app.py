"""The mock engine's app: its generation routes (`engine.py`), and vLLM's sleep mode, runtime LoRA, metrics and
health, plus the routes tests read the mock's own records from."""

from __future__ import annotations

import hmac
import os

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from engines.mock_server import messages
from engines.mock_server.answer import MockConfig, error_response, output_line
from engines.mock_server.engine import MockEngine
from engines.mock_server.responses import respond

__all__ = ["MockConfig", "MockEngine", "create_app"]


class Extras:
    """The routes besides generation, over the engine's state."""

    def __init__(self, engine: MockEngine) -> None:
        self.engine = engine

    # -- vLLM's sleep mode: the weights' GPU memory given back, then taken again ------------------------------

    async def sleep(self, request: Request) -> Response:
        level = int(request.query_params.get("level", "1"))
        if self.engine.config.weights is not None and self.engine.config.weights_mb and not self.engine.asleep:
            self.engine.config.weights.release_all()
        self.engine.asleep[:] = [level]
        output_line(f"mock engine: sleeping at level {level}")
        return Response(status_code=200)

    async def wake_up(self, request: Request) -> Response:
        if self.engine.config.weights is not None and self.engine.config.weights_mb and self.engine.asleep:
            self.engine.config.weights.hold(self.engine.config.weights_mb)
        self.engine.asleep.clear()
        output_line("mock engine: awake")
        return Response(status_code=200)

    async def is_sleeping(self, request: Request) -> Response:
        return JSONResponse({"is_sleeping": bool(self.engine.asleep)})

    # -- vLLM's runtime LoRA: adapters by name, from a folder on disk ---------------------------------------

    async def load_lora_adapter(self, request: Request) -> Response:
        body = await request.json()
        name, path = body.get("lora_name"), body.get("lora_path")
        if not name or not path:
            return error_response("Both 'lora_name' and 'lora_path' must be provided.")
        if name in self.engine.adapters:
            return error_response(f"The lora adapter '{name}' has already been loaded.")
        if not os.path.isdir(path):
            return error_response(f"Loading lora {name} failed: No adapter found for {path}", 404)
        self.engine.adapters[name] = path
        return Response(f"Success: LoRA adapter '{name}' added successfully.", media_type="text/plain")

    async def unload_lora_adapter(self, request: Request) -> Response:
        name = (await request.json()).get("lora_name")
        if name not in self.engine.adapters:
            return error_response(f"The lora adapter '{name}' cannot be found.", 404)
        del self.engine.adapters[name]
        return Response(f"Success: LoRA adapter '{name}' removed successfully.", media_type="text/plain")

    async def health(self, request: Request) -> Response:
        return Response(status_code=200)

    async def echo(self, request: Request) -> Response:
        """What reached the engine: for tests of what the proxy forwards."""
        body = (await request.body()).decode(errors="replace")
        return JSONResponse(
            {
                "method": request.method,
                "headers": dict(request.headers),
                "header_list": request.headers.items(),  # a repeated header repeated, in order
                "query": request.url.query,
                "body": body,
            }
        )

    async def metrics(self, request: Request) -> Response:
        """Shaped as vLLM's /metrics: its load gauges among histogram lines, labelled as vLLM labels them."""
        labels = f'engine="0",model_name="{self.engine.config.model}"'
        running = self.engine.stats.in_flight - self.engine.stats.waiting
        lines = [
            "# HELP vllm:num_requests_running Number of requests in model execution batches.",
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{{{labels}}} {float(running)}",
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{{{labels}}} {float(self.engine.stats.waiting)}",
            "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
            "# TYPE vllm:kv_cache_usage_perc gauge",
            f"vllm:kv_cache_usage_perc{{{labels}}} {running / (self.engine.config.max_num_seqs or 256)}",
            "# HELP vllm:request_success_total Count of successfully processed requests.",
            "# TYPE vllm:request_success_total counter",
            f'vllm:request_success_total{{{labels},finished_reason="stop"}} {float(self.engine.stats.completed)}',
            "# TYPE vllm:e2e_request_latency_seconds histogram",
            *(f'vllm:e2e_request_latency_seconds_bucket{{{labels},le="{le}"}} 0.0' for le in ("0.3", "1.0", "+Inf")),
        ]
        return Response("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4; charset=utf-8")

    async def mock_stats(self, request: Request) -> Response:
        fields = ("started", "completed", "cancelled", "in_flight")
        return JSONResponse({name: getattr(self.engine.stats, name) for name in fields})

    async def mock_last_headers(self, request: Request) -> Response:
        """The headers of the last chat or completion request: what a proxy in front forwarded."""
        return JSONResponse(self.engine.stats.last_headers)

    async def responses(self, request: Request) -> Response:
        """vLLM's Responses API (`responses.py`)."""
        return await respond(self.engine, request)

    async def messages(self, request: Request) -> Response:
        """vLLM's Anthropic Messages API (`messages.py`)."""
        return await messages.respond(self.engine, request)

    async def mock_outputs(self, request: Request) -> Response:
        """When a recent streamed answer's output steps were written, by the engine's own clock."""
        times = self.engine.stats.outputs_ms.get(request.path_params["answer_id"])
        return JSONResponse({"output_ms": times}, status_code=200 if times is not None else 404)


def create_app(config: MockConfig) -> Starlette:
    engine = MockEngine(config)
    extras = Extras(engine)
    features = []
    if config.sleep_mode:
        features += [
            Route("/sleep", extras.sleep, methods=["POST"]),
            Route("/wake_up", extras.wake_up, methods=["POST"]),
            Route("/is_sleeping", extras.is_sleeping, methods=["GET"]),
        ]
    if config.runtime_lora:
        features += [
            Route("/v1/load_lora_adapter", extras.load_lora_adapter, methods=["POST"]),
            Route("/v1/unload_lora_adapter", extras.unload_lora_adapter, methods=["POST"]),
        ]
    return Starlette(
        middleware=[Middleware(_KeyRequired, key=config.api_key)] if config.api_key else [],
        routes=[
            *features,
            Route("/v1/chat/completions", engine.generate, methods=["POST"]),
            Route("/v1/completions", engine.generate, methods=["POST"]),
            Route("/v1/embeddings", engine.embeddings, methods=["POST"]),
            Route("/v1/responses", extras.responses, methods=["POST"]),
            Route("/v1/messages", extras.messages, methods=["POST"]),
            Route("/v1/models", engine.models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", engine.model, methods=["GET"]),
            Route("/health", extras.health, methods=["GET"]),
            Route("/metrics", extras.metrics, methods=["GET"]),
            Route("/mock/stats", extras.mock_stats, methods=["GET"]),
            Route("/mock/outputs/{answer_id}", extras.mock_outputs, methods=["GET"]),
            Route("/mock/last-headers", extras.mock_last_headers, methods=["GET"]),
            Route("/v1/mock/echo", extras.echo, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
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
