"""What sidecar/server/http_server.py takes of uvicorn's httptools protocol, which uvicorn does not promise to keep.

pyproject pins the minor release the suite runs against (`uvicorn~=0.55.0`); this fails, naming what moved, when
a new uvicorn no longer has a method the sidecar's protocol extends or an attribute it reads, before any
end-to-end test fails in a way that is hard to trace back here.
"""

from __future__ import annotations

import asyncio
import inspect
import logging

import uvicorn
from uvicorn.config import Config
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from sidecar.dataplane.exchange import send_now
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


class _Transport:
    """What a request's cycle writes to: the bytes kept."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def test_a_body_sent_while_the_client_takes_writes_goes_out_without_waiting() -> None:
    """The relay writes a stream's first token from the engine connection's read callback (`exchange.send_now`),
    which cannot await: uvicorn's `send` of a body must write it in one step while the client's buffer has room,
    and, while it is full, wait before writing anything."""
    transport = _Transport()
    flow = FlowControl(transport)  # type: ignore[arg-type]
    scope = {"type": "http", "method": "POST", "path": "/", "http_version": "1.1", "headers": []}
    cycle = RequestResponseCycle(
        scope,  # type: ignore[arg-type]
        transport,  # type: ignore[arg-type]
        flow,
        logging.getLogger("test"),
        logging.getLogger("test.access"),
        access_log=False,
        default_headers=[],
        message_event=asyncio.Event(),
        expect_100_continue=False,
        keep_alive=True,
        on_response=lambda: None,
    )
    await cycle.send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    event = {"type": "http.response.body", "body": b"data: token\n\n", "more_body": True}
    assert send_now(cycle.send, event)  # type: ignore[arg-type]
    assert transport.written[-1].endswith(b"data: token\n\n\r\n")
    flow.pause_writing()
    written = len(transport.written)
    assert not send_now(cycle.send, event)  # type: ignore[arg-type]
    assert len(transport.written) == written
