"""What can go wrong with a request to the engine, as the proxy's client (`upstream.py`) raises it:

    UpstreamError
    ├── ConnectFailed: nothing answered at the engine's address (refused, unreachable, unknown host, TLS)
    │   └── OutOfDescriptors: the sidecar's own open-files limit left no descriptor for the connection
    ├── Disconnected: the engine closed the connection before its answer was complete
    └── BadAnswer: what the engine answered cannot be relayed (not HTTP/1.1, or a status HTTP does not have)
        └── HeadTooLarge: its status line and headers went past the pool's bound

A `Disconnected` before the answer began, on a pooled connection, is tried once more on a new one (the engine
closed the connection as it was reused); a `BadAnswer` is not: the engine did answer.
"""

from __future__ import annotations

import copy


class UpstreamError(Exception):
    """The engine could not be reached, its connection broke, or its answer cannot be relayed."""


class ConnectFailed(UpstreamError):
    """Nothing answered at the engine's address (refused, unreachable, unknown host)."""


class OutOfDescriptors(ConnectFailed):
    """The sidecar's own open-files limit left no descriptor for the connection: the engine is not at fault."""


class Disconnected(UpstreamError):
    """The engine closed the connection before its answer was complete."""


class BadAnswer(UpstreamError):
    """What the engine answered is not HTTP/1.1 the sidecar can relay: the connection is dropped unread."""


class HeadTooLarge(BadAnswer):
    """The engine's status line and headers went past the pool's bound."""


def fresh(error: UpstreamError) -> UpstreamError:
    """A new instance of an error that is kept (a response's, to raise on every read), to raise in its place:
    raising the kept one gives it a traceback whose frames hold what keeps it, a reference cycle with the whole
    exchange in it that only the garbage collector frees (`sidecar/server/garbage.py`)."""
    return copy.copy(error)  # the message only: no traceback, cause or context
