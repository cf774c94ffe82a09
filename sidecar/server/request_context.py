"""Request id, one access line per request, and the last resort for unexpected exceptions."""

from __future__ import annotations

import functools
import hmac
import os
import re
import time
from collections.abc import Callable
from typing import Any

import structlog
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sidecar import request_state
from sidecar.dataplane.backlog import Backlog
from sidecar.errors import internal_error, send_error
from sidecar.http import header
from sidecar.logs import get_logger, write_record
from sidecar.workers.pool import INTERNAL_HEADER

log = get_logger("sidecar.access")

_INTERNAL_HEADER = INTERNAL_HEADER.encode()

_REQUEST_ID_HEADER = b"x-request-id"
# What nginx logs for a request whose client left before it was answered: logged and counted, never sent.
CLIENT_CLOSED_REQUEST = 499
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}")


def incoming_request_id(value: str | None) -> str | None:
    """The client's id when it is safe to echo and log (bounded, no control characters), else None."""
    if value is not None and _VALID_REQUEST_ID.fullmatch(value):
        return value
    return None


def client_left(scope: Scope) -> int:
    """The status to log for a request whose client left before it could be answered (in the middle of sending
    its body, say): nginx's 499, not an error of the sidecar's; the access line says `client_disconnected`. Or
    408 with `client_timed_out`, where the server gave up waiting for the body and answered that itself."""
    state = request_state.of(scope)
    if state.client_timed_out:
        state.log_fields["client_timed_out"] = True
        return 408
    state.log_fields["client_disconnected"] = True
    return CLIENT_CLOSED_REQUEST


class RequestContextMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        on_complete: Callable[[str, int | None, dict[str, Any]], None] | None = None,
        internal_token: str | None = None,
        worker: int | None = None,
        backlog: Backlog | None = None,
    ) -> None:
        self.app = app
        # Where the access line waits for a moment the loop has nothing more urgent (else it is written at once);
        # every GET runs what waits first: it may read what that writes (the history, the metrics).
        self.backlog = backlog
        # With data-plane workers: which one answered, in an X-Sidecar-Worker header (as load balancers' X-Served-By).
        self.worker_header = None if worker is None else (b"x-sidecar-worker", str(worker).encode())
        self.on_complete = on_complete  # told of every request once answered: path, status, the access fields
        # With data-plane workers: a call between the sidecar's processes, which carries this token, is logged at
        # debug level and not counted (the worker that took the client's request counts and logs it).
        self.internal_token = internal_token.encode() if internal_token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        if self.backlog is not None and scope["method"] == "GET":
            self.backlog.run()
        # A new id: 128 random bits in hex (uuid4().hex fixes 6 of them), at a third of uuid4's cost.
        incoming = incoming_request_id(header(scope, _REQUEST_ID_HEADER))
        request_id = incoming or os.urandom(16).hex()
        state = request_state.of(scope)
        state.request_id = request_id
        # The engine's id is unique whatever clients send: engines key their requests by it, and two at once with
        # one id break them (vLLM until vllm#27987: a 400 for the second, an abort of the wrong one, a hang). The
        # client's id stays its prefix, which ties the engine's logs to the sidecar's.
        state.engine_request_id = request_id if incoming is None else f"{incoming}-{os.urandom(8).hex()}"
        status: int | None = None
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id.encode())]
                if self.worker_header is not None:
                    message["headers"].append(self.worker_header)
            await send(message)

        internal = self.internal_token is not None and _carries(scope, self.internal_token)
        state.internal = internal  # the internal routes answer only these
        bound = structlog.contextvars.bind_contextvars(request_id=request_id)
        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:  # raised where the body is read (the generation routes read it outside Starlette)
            if status is None:
                status = client_left(scope)
        except Exception:
            log.exception("unhandled_error", method=scope["method"], path=scope["path"])
            if status is None:
                await send_error(internal_error(), scope, receive, send_with_id)
        finally:
            duration_ms = round((time.perf_counter() - start) * 1000, 3)
            line = functools.partial(self._access_line, scope, status, duration_ms, internal)
            if self.backlog is not None:
                self.backlog.add(line)  # in this context: the line carries the request's bound fields
            else:
                line()
            structlog.contextvars.reset_contextvars(**bound)

    def _access_line(self, scope: Scope, status: int | None, duration_ms: float, internal: bool) -> None:
        fields = request_state.of(scope).log_fields  # as the proxy's record of the request left them
        write_record(
            "sidecar.access",
            "debug" if internal else "info",
            # In the order structlog's logger would put them (the event after the fields): the JSON lines' order.
            {"method": scope["method"], "path": scope["path"], "status": status, "duration_ms": duration_ms}
            | fields
            | {"event": "request"},
        )
        if self.on_complete is not None and not internal:
            self.on_complete(scope["path"], status, fields)


def _carries(scope: Scope, token: bytes) -> bool:
    """Whether the request carries this run's internal token (compared in constant time)."""
    for name, value in scope["headers"]:
        if name == _INTERNAL_HEADER:
            return hmac.compare_digest(value, token)
    return False
