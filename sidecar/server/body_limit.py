"""Request bodies: 413 for one over `SIDECAR_MAX_BODY_BYTES`, counted while it streams in, so no body is ever
buffered past it; 503 for one that would take the bodies being handled past `SIDECAR_MAX_BODY_BYTES_IN_FLIGHT`.

A body is held while its request is handled (read whole, parsed, its bytes kept for the engine until the answer
ends), so 16 MB bodies on a thousand connections would take 16 GB and the container's memory with them, the
engine's too. Each request's body counts against the budget from its declared length (or as it streams in)
until the request ends; past the budget the request gets 503 `sidecar_overloaded` with Retry-After before its
body is read, and the bodies in flight are served.
"""

from __future__ import annotations

from starlette.types import Message, Receive, Scope

from sidecar import request_state
from sidecar.errors import BadRequest, PayloadTooLarge, SidecarOverloaded
from sidecar.http import header
from sidecar.logs import Throttle, get_logger

log = get_logger("sidecar.http")


class BodyLimit:
    def __init__(self, max_bytes: int, max_in_flight: int = 0) -> None:
        self.max_bytes = max_bytes
        self.max_in_flight = max_in_flight
        self.in_flight = 0  # bytes of the bodies of the requests being handled
        self._refusals = Throttle(5.0)

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"request body is larger than the limit of {self.max_bytes} bytes")

    def bounded(self, scope: Scope, receive: Receive) -> Receive:
        """The request's `receive`, which raises 413 past the limit; a declared length over it (or not a number)
        raises here, and so does one the budget has no room for (503). A declared length within both bounds the
        body already (HTTP's framing ends the body there): `receive` is returned as it is. Whoever calls it calls
        `release` when the request ends."""
        declared = header(scope, b"content-length")
        if declared is not None:
            if not declared.isdigit():
                raise BadRequest("invalid Content-Length header")
            if int(declared) > self.max_bytes:
                raise self._too_large()
            self._hold(scope, int(declared))
            return receive

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                size = len(message.get("body", b""))
                received += size
                if received > self.max_bytes:
                    # Raised inside whoever reads the body; the exception handlers answer 413.
                    raise self._too_large()
                self._hold(scope, size)
            return message

        return limited_receive

    def _hold(self, scope: Scope, size: int) -> None:
        if not size:
            return
        if self.max_in_flight and self.in_flight + size > self.max_in_flight:
            if refused := self._refusals.due():
                log.warning(
                    "body_bytes_in_flight_full", in_flight=self.in_flight, budget=self.max_in_flight, refused=refused
                )
            raise SidecarOverloaded(
                f"the request bodies being handled take {self.in_flight} of the {self.max_in_flight} bytes the "
                "sidecar holds at once (SIDECAR_MAX_BODY_BYTES_IN_FLIGHT): retry"
            )
        self.in_flight += size
        request_state.of(scope).body_bytes_held += size

    def release(self, scope: Scope) -> None:
        """The request ended: its body no longer counts."""
        state = request_state.of(scope)
        self.in_flight -= state.body_bytes_held
        state.body_bytes_held = 0
