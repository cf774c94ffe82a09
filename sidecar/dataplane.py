"""OpenAI routes. Until an engine is ready they validate the body and answer 503 with Retry-After."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sidecar.errors import ServiceUnavailable
from sidecar.http import read_json_object
from sidecar.supervisor import Supervisor


def _not_ready(request: Request) -> ServiceUnavailable:
    supervisor: Supervisor = request.app.state.supervisor
    return ServiceUnavailable(f"no model is loaded (engine state: {supervisor.state})")


async def openai_post(request: Request) -> Response:
    await read_json_object(request)  # a bad body is a 400 whether or not an engine is loaded
    raise _not_ready(request)


async def passthrough(request: Request) -> Response:
    raise _not_ready(request)


routes = [
    Route("/v1/chat/completions", openai_post, methods=["POST"]),
    Route("/v1/completions", openai_post, methods=["POST"]),
    Route("/v1/embeddings", openai_post, methods=["POST"]),
    Route("/v1/{path:path}", passthrough, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
]
