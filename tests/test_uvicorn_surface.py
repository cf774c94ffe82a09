"""What sidecar/server/http_server.py takes of uvicorn's httptools protocol, which uvicorn does not promise to keep.

pyproject pins the minor release the suite runs against (`uvicorn~=0.55.0`); this fails, naming what moved, when
a new uvicorn no longer has a method the sidecar's protocol extends or an attribute it reads, before any
end-to-end test fails in a way that is hard to trace back here.
"""

from __future__ import annotations

import asyncio
import inspect

import uvicorn
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from sidecar.server.http_server import HttpProtocol

# The base class's methods the sidecar's protocol overrides (calling them through super(), but where it says).
EXTENDED = (
    "connection_made",
    "connection_lost",
    "pause_writing",
    "resume_writing",
    "data_received",
    "on_headers_complete",
    "on_body",
    "on_message_complete",
    "send_400_response",
    "_unsupported_upgrade_warning",  # replaced, not extended: what an upgrade request the server cannot take gets
)
# Attributes it reads of the protocol and of a request's cycle.
PROTOCOL_ATTRIBUTES = ("cycle", "transport", "loop", "server_state", "url", "headers")
CYCLE_ATTRIBUTES = ("scope", "response_started", "response_complete", "keep_alive")


def test_the_methods_the_protocol_extends_are_still_uvicorns() -> None:
    missing = [name for name in EXTENDED if not callable(getattr(HttpToolsProtocol, name, None))]
    assert not missing, f"uvicorn {uvicorn.__version__}'s HttpToolsProtocol no longer has {missing}"
    for name in EXTENDED:
        ours, theirs = (
            inspect.signature(getattr(HttpProtocol, name)),
            inspect.signature(getattr(HttpToolsProtocol, name)),
        )
        assert list(ours.parameters) == list(theirs.parameters), (
            f"{name}{theirs} changed in uvicorn {uvicorn.__version__}"
        )


async def test_the_attributes_it_reads_are_set_by_uvicorn() -> None:
    config = Config(app=lambda scope, receive, send: None, http="httptools")
    config.load()
    protocol = HttpToolsProtocol(config, ServerState(), app_state={}, _loop=asyncio.get_running_loop())
    protocol.on_message_begin()  # where a request's url and headers begin
    missing = [name for name in PROTOCOL_ATTRIBUTES if not hasattr(protocol, name)]
    assert not missing, f"uvicorn {uvicorn.__version__}'s protocol no longer sets {missing}"
    cycle_fields = set(inspect.signature(RequestResponseCycle.__init__).parameters) | set(
        RequestResponseCycle.__init__.__code__.co_names
    )
    missing = [name for name in CYCLE_ATTRIBUTES if name not in cycle_fields]
    assert not missing, f"uvicorn {uvicorn.__version__}'s RequestResponseCycle no longer has {missing}"
    assert hasattr(protocol.server_state, "default_headers")
