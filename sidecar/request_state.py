"""What the layers that handle one request tell each other: one typed object in the request's ASGI scope.

The server's protocol, the request-context middleware, auth, the body limit and the proxy each set their part of
it; every layer reads it through `of(scope)`, which makes it on first use. It lives in `scope["state"]`, which
ASGI servers copy for each request.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.types import Scope

_KEY = "sidecar"


@dataclass(slots=True, eq=False)
class RequestState:
    request_id: str = ""
    # What the engine gets as the request's id: the sidecar's own id, or the client's with a random suffix (below).
    engine_request_id: str = ""
    # A call between the sidecar's processes (SIDECAR_WORKERS > 1) that carries this run's token.
    internal: bool = False
    # What the inner layers add to the request's access line (key fingerprint, model, performance).
    log_fields: dict[str, Any] = field(default_factory=dict)
    # What this request's body counts against SIDECAR_MAX_BODY_BYTES_IN_FLIGHT while it is handled.
    body_bytes_held: int = 0
    # The client's connection was lost before the response completed.
    client_gone: bool = False
    # The server gave up on the client (its body did not come, or it left its buffer full): logged 408.
    client_timed_out: bool = False
    # While the proxy relays the request: what cancels the exchange when the client goes (exchange.ClientWatch).
    on_client_gone: Callable[[], None] | None = None
    # Once the client's buffer has been full: (paused, since), whether it is full now and since when (perf_counter
    # seconds) it has been, or was drained last. The engine's timeout does not count time spent waiting on the
    # client (exchange.Deadline).
    client_writes: tuple[bool, float] | None = None

    def connection_lost(self) -> None:
        """The server's word that the client's connection is gone before its response completed."""
        self.client_gone = True
        gone, self.on_client_gone = self.on_client_gone, None
        if gone is not None:
            gone()


def of(scope: Scope) -> RequestState:
    """This request's state, made on first use."""
    state: dict[str, Any] = scope.setdefault("state", {})
    found: RequestState | None = state.get(_KEY)
    if found is None:
        found = state[_KEY] = RequestState()
    return found
