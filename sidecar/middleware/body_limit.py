"""413 for bodies over the limit, counted while they stream in, so no body is ever buffered past it."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sidecar.errors import BadRequest, PayloadTooLarge, SidecarError, send_error
from sidecar.http import header


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"request body is larger than the limit of {self.max_bytes} bytes")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            try:
                receive = self.bounded(scope, receive)
            except SidecarError as error:
                await send_error(error, scope, receive, send)
                return
        await self.app(scope, receive, send)

    def bounded(self, scope: Scope, receive: Receive) -> Receive:
        """The request's `receive`, which raises 413 past the limit; a declared length over it (or not a number)
        raises here. A declared length within it bounds the body already (HTTP's framing ends the body there):
        `receive` is returned as it is. The app's generation routes call it directly, outside the layer."""
        declared = header(scope, b"content-length")
        if declared is not None:
            if not declared.isdigit():
                raise BadRequest("invalid Content-Length header")
            if int(declared) > self.max_bytes:
                raise self._too_large()
            return receive

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Raised inside whoever reads the body; the exception handlers answer 413.
                    raise self._too_large()
            return message

        return limited_receive
