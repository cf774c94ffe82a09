"""The sidecar's own endpoints, described once: for `GET /` and `GET /openapi.json`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from sidecar.control.engine import AdapterName, AdapterRequest, LoadRequest, SleepRequest
from sidecar.server.auth import Plane, plane_for


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    summary: str


ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("GET", "/", "Name, version and endpoints of the sidecar"),
    Endpoint("GET", "/health", "Liveness: 200 while the sidecar runs, with the engine's state"),
    Endpoint("GET", "/ready", "Readiness: 200 only while an engine is ready to serve, else 503"),
    Endpoint("GET", "/openapi.json", "This document"),
    Endpoint(
        "GET", "/metrics", "Prometheus metrics: requests, TTFT, TPOT, ITL, latency, tokens, engine, CPU, RAM, GPU"
    ),
    Endpoint("GET", "/v1/telemetry", "Latest resource sample and a recent window's min, mean and max (?window_s=60)"),
    Endpoint("POST", "/v1/chat/completions", "OpenAI chat completions, proxied to the engine"),
    Endpoint("POST", "/v1/completions", "OpenAI text completions, proxied to the engine"),
    Endpoint("POST", "/v1/embeddings", "OpenAI embeddings, proxied to the engine"),
    Endpoint("GET", "/v1/models", "The engine's models"),
    Endpoint("GET", "/v1/requests/{request_id}", "usage.performance and status of a recent request, by X-Request-ID"),
    Endpoint("POST", "/v1/model/load", "Start an engine with a model; 200 when ready (wait), 202 at once (no wait)"),
    Endpoint("POST", "/v1/model/unload", "Drain in-flight requests, stop the engine's whole process group"),
    Endpoint("GET", "/v1/model", "The engine's state, process, uptime, restarts, last error and output tail"),
    Endpoint("GET", "/v1/model/logs", "The engine's output as it comes (server-sent events), its kept tail first"),
    Endpoint("POST", "/v1/model/sleep", "Put the engine to sleep (its GPU memory freed, the process kept): vLLM"),
    Endpoint("POST", "/v1/model/wake", "Wake a sleeping engine: its GPU memory taken back, ready again"),
    Endpoint("GET", "/v1/model/adapters", "The LoRA adapters the engine has loaded, as it lists them"),
    Endpoint("POST", "/v1/model/adapters/load", "Load a LoRA adapter into the engine by name and path: vLLM, SGLang"),
    Endpoint("POST", "/v1/model/adapters/unload", "Unload a LoRA adapter from the engine by name"),
)

_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "integer", "null"]},
            },
        }
    },
}


_UNLOAD_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"drain_timeout_s": {"type": "number", "minimum": 0}},
    "additionalProperties": False,
}


_BODIES: dict[str, type[BaseModel]] = {
    "/v1/model/load": LoadRequest,
    "/v1/model/sleep": SleepRequest,
    "/v1/model/adapters/load": AdapterRequest,
    "/v1/model/adapters/unload": AdapterName,
}


def _request_schema(endpoint: Endpoint) -> dict[str, Any]:
    if endpoint.path in _BODIES:
        return _BODIES[endpoint.path].model_json_schema()
    if endpoint.path == "/v1/model/unload":
        return _UNLOAD_SCHEMA
    return {"type": "object"}  # OpenAI's bodies: the engine's to judge


def _operation(endpoint: Endpoint) -> dict[str, Any]:
    responses: dict[str, Any] = {
        "200": {"description": "OK"},
        "default": {
            "description": "An OpenAI-style error",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        },
    }
    operation: dict[str, Any] = {"summary": endpoint.summary, "responses": responses}
    if plane_for(endpoint.path) is Plane.OPEN:
        operation["security"] = []
    elif plane_for(endpoint.path) is Plane.CONTROL:
        operation["security"] = [{"adminBearer": []}, {"adminApiKey": []}]
    if endpoint.method == "POST":
        operation["requestBody"] = {
            "required": endpoint.path not in ("/v1/model/unload", "/v1/model/sleep", "/v1/model/wake"),
            "content": {"application/json": {"schema": _request_schema(endpoint)}},
        }
    return operation


def openapi_document(version: str) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for endpoint in ENDPOINTS:
        paths.setdefault(endpoint.path, {})[endpoint.method.lower()] = _operation(endpoint)
    return {
        "openapi": "3.1.0",
        "info": {"title": "LLM engine sidecar", "version": version},
        "paths": paths,
        "components": {
            "schemas": {"Error": _ERROR_SCHEMA},
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "adminBearer": {"type": "http", "scheme": "bearer", "description": "an admin key"},
                "adminApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "an admin key"},
            },
        },
        "security": [{"bearer": []}, {"apiKey": []}],
    }
