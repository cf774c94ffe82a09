"""The errors the sidecar answers with, and the one place that turns them into OpenAI error bodies.

SidecarError (500 server_error)
├── BadRequest (400 invalid_request_error)
├── Unauthorized (401 authentication_error)
├── Forbidden (403 permission_error)
├── NotFound (404 not_found_error)
├── MethodNotAllowed (405 invalid_request_error)
├── RequestTimeout (408 invalid_request_error)
├── Conflict (409 invalid_request_error)
├── PayloadTooLarge (413 invalid_request_error)
├── RequestHeadersTooLarge (431 invalid_request_error)
├── TooManyRequests (429 rate_limit_error, with Retry-After)
├── BadGateway (502 server_error)
├── ServiceUnavailable (503 service_unavailable, with Retry-After)
│   └── SidecarOverloaded (503 sidecar_overloaded: the sidecar's open files or bodies in flight; retry in 1 s)
└── GatewayTimeout (504 timeout_error)
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send


class SidecarError(Exception):
    status_code: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = "internal_error"
    retry_after_s: ClassVar[int | None] = None  # a Retry-After header: when the client may try again

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.headers = headers or {}
        if self.retry_after_s is not None:
            self.headers.setdefault("Retry-After", str(self.retry_after_s))

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, param=self.param, code=self.code)


class BadRequest(SidecarError):
    status_code = 400
    error_type = "invalid_request_error"
    default_code = None


class Unauthorized(SidecarError):
    status_code = 401
    error_type = "authentication_error"
    default_code = "missing_api_key"


class Forbidden(SidecarError):
    status_code = 403
    error_type = "permission_error"
    default_code = "invalid_api_key"


class NotFound(SidecarError):
    status_code = 404
    error_type = "not_found_error"
    default_code = "not_found"


class MethodNotAllowed(SidecarError):
    status_code = 405
    error_type = "invalid_request_error"
    default_code = "method_not_allowed"

    @classmethod
    def on(cls, method: str, path: str, allow: str) -> MethodNotAllowed:
        """`method` on `path`, which takes only the methods in `allow` (its `Allow` header)."""
        return cls(f"method {method} is not allowed on {path}", headers={"Allow": allow})


class RequestTimeout(SidecarError):
    """A client that stopped sending its request's head or body (sidecar/server/http_server.py)."""

    status_code = 408
    error_type = "invalid_request_error"
    default_code = "request_timeout"


class Conflict(SidecarError):
    status_code = 409
    error_type = "invalid_request_error"
    default_code = "conflict"


class PayloadTooLarge(SidecarError):
    status_code = 413
    error_type = "invalid_request_error"
    default_code = "request_too_large"

    def __init__(self, message: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        # The rest of the body is never read: the connection cannot be reused.
        self.headers.setdefault("Connection", "close")


class RequestHeadersTooLarge(SidecarError):
    """A request line and headers past SIDECAR_MAX_HEADER_BYTES (sidecar/server/http_server.py)."""

    status_code = 431
    error_type = "invalid_request_error"
    default_code = "headers_too_large"


class TooManyRequests(SidecarError):
    """Admission control's answer: the sidecar's queue is full, or the request waited in it too long."""

    status_code = 429
    error_type = "rate_limit_error"
    default_code = "queue_full"
    retry_after_s = 1


class BadGateway(SidecarError):
    status_code = 502
    error_type = "server_error"
    default_code = "engine_error"


class EngineLoop(SidecarError):
    """A request that came back to a sidecar process it already passed through: the engine's URL leads back to
    the sidecar (`sidecar/dataplane/exchange.py`, by its `Via` header)."""

    status_code = 508
    error_type = "server_error"
    default_code = "engine_loop"


class ServiceUnavailable(SidecarError):
    status_code = 503
    error_type = "service_unavailable"
    default_code = "engine_not_ready"
    retry_after_s = 5


class SidecarOverloaded(ServiceUnavailable):
    """The sidecar has no descriptor to serve a request with (sidecar/telemetry/resources.py), or no room for its body
    (sidecar/server/body_limit.py): its own limits, not the engine's."""

    default_code = "sidecar_overloaded"
    retry_after_s = 1


class GatewayTimeout(SidecarError):
    status_code = 504
    error_type = "timeout_error"
    default_code = "engine_timeout"


def error_body(
    message: str, error_type: str, *, param: str | None = None, code: str | int | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(exc: SidecarError) -> Response:
    return Response(
        json.dumps(exc.body()),
        status_code=exc.status_code,
        headers=exc.headers,
        media_type="application/json",
    )


async def send_error(exc: SidecarError, scope: Scope, receive: Receive, send: Send) -> None:
    """For ASGI middleware, which answers outside Starlette's exception handlers."""
    await error_response(exc)(scope, receive, send)


_HTTP_STATUS_ERRORS: dict[int, type[SidecarError]] = {
    400: BadRequest,
    404: NotFound,
    405: MethodNotAllowed,
    413: PayloadTooLarge,
}


async def handle_sidecar_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, SidecarError)
    return error_response(exc)


def internal_error() -> SidecarError:
    """What a client is told of an exception nobody expected: nothing of its text or its traceback."""
    return SidecarError("internal server error")


async def handle_unexpected_error(request: Request, exc: Exception) -> Response:
    """Starlette's last resort answers in the OpenAI shape too; the request's access middleware logs it."""
    return error_response(internal_error())


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 (no route, wrong method) in the OpenAI shape."""
    assert isinstance(exc, HTTPException)
    allow = (exc.headers or {}).get("Allow")
    if exc.status_code == 405 and allow is not None:  # Starlette's routes name their methods in `Allow`
        return error_response(MethodNotAllowed.on(request.method, request.url.path, allow))
    error_class = _HTTP_STATUS_ERRORS.get(exc.status_code, SidecarError)
    if exc.status_code == 404:
        message = f"no route for {request.method} {request.url.path}"
    else:
        message = str(exc.detail)
    error = error_class(message, headers=dict(exc.headers or {}))
    return error_response(error)


_ENGINE_MESSAGE_LIMIT = 2000
_OPENAI_ERROR_FIELDS = frozenset({"message", "type", "param", "code"})


def engine_error_body(status: int, raw: bytes) -> dict[str, Any]:
    """An engine's own error response in the OpenAI shape, its message kept, and the fields it adds to those four.

    Engines answer `{"error": {...}}` (OpenAI, llama.cpp, newer vLLM), `{"object": "error", "message": ...,
    "code": 400}` (older vLLM), `{"error": "...", "error_type": "..."}` (TGI), or plain text.
    """
    default_type = "invalid_request_error" if status < 500 else "server_error"
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    if isinstance(value, dict):
        inner = value.get("error")
        beside: dict[str, Any] = {}
        if isinstance(inner, dict):
            value = inner
            # What the engine says beside OpenAI's four stays (llama-server's n_prompt_tokens and n_ctx for a prompt
            # past its context): a client of that engine may read it, the SDKs pass over it.
            beside = {key: field for key, field in inner.items() if key not in _OPENAI_ERROR_FIELDS}
        elif isinstance(inner, str):  # TGI
            value = {"message": inner, "type": value.get("error_type")}
        message = value.get("message") if isinstance(value.get("message"), str) else None
        if message is None and isinstance(value.get("detail"), str):  # FastAPI's own errors
            message = value["detail"]
        if message is not None:
            error_type = value.get("type")
            param = value.get("param")
            code = value.get("code")
            body = error_body(
                message,
                error_type if isinstance(error_type, str) and error_type else default_type,
                param=param if isinstance(param, str) else None,
                # OpenAI's code is a string; vLLM and llama.cpp put the HTTP status there, which the status says.
                code=code if isinstance(code, str) else None,
            )
            body["error"] |= beside
            return body
    text = raw.decode(errors="replace").strip()[:_ENGINE_MESSAGE_LIMIT] or f"the engine answered {status}"
    return error_body(text, default_type)
