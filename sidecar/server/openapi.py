"""`GET /openapi.json`: the route table's endpoints (`routes.py`) as OpenAPI 3.1."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sidecar.server.endpoint import Endpoint, Plane

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


def _request_schema(endpoint: Endpoint) -> dict[str, Any]:
    body = endpoint.body
    if isinstance(body, type):
        return body.model_json_schema()
    return body or {"type": "object"}


def _operation(endpoint: Endpoint, method: str) -> dict[str, Any]:
    responses: dict[str, Any] = {
        "200": {"description": "OK"},
        "default": {
            "description": "An OpenAI-style error",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        },
    }
    operation: dict[str, Any] = {"summary": endpoint.summary, "responses": responses}
    if endpoint.plane in (Plane.OPEN, Plane.METRICS):  # the metrics' key is a setting: open by default
        operation["security"] = []
    elif endpoint.plane is Plane.CONTROL:
        operation["security"] = [{"adminBearer": []}, {"adminApiKey": []}]
    if method == "POST":
        operation["requestBody"] = {
            "required": endpoint.body_required,
            "content": {"application/json": {"schema": _request_schema(endpoint)}},
        }
    return operation


def openapi_document(version: str, endpoints: Iterable[Endpoint]) -> dict[str, Any]:
    """The OpenAPI 3.1 description of the endpoints that have a summary."""
    paths: dict[str, dict[str, Any]] = {}
    for endpoint in endpoints:
        if endpoint.summary is None:
            continue
        for method in endpoint.methods:
            paths.setdefault(endpoint.path, {})[method.lower()] = _operation(endpoint, method)
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
