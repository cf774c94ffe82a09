"""What the engine receives: the client's own bytes, with only the usage request the sidecar needs added."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import httpx
import pytest

from tests.fake_engine import FakeEngine, serving
from tests.processes import SidecarProcess
from tests.proxy.conftest import AUTH, KEY

CHAT = "/v1/chat/completions"


class _Recording(FakeEngine):
    """Keeps every chat body it is sent; answers with one token and the usage chunk."""

    bodies: ClassVar[list[bytes]] = []

    def chat(self) -> bool:
        type(self).bodies.append(self.body)
        base = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "fake"}
        token = base | {"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]}
        usage = base | {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}
        events = b"".join(b"data: " + json.dumps(event).encode() + b"\n\n" for event in (token, usage))
        self.send(b"text/event-stream", events + b"data: [DONE]\n\n")
        return True


@pytest.fixture
def sidecar(start_sidecar: Callable[..., SidecarProcess]) -> Iterator[SidecarProcess]:
    _Recording.bodies = []
    with serving(_Recording) as url:
        process = start_sidecar({"SIDECAR_API_KEYS": KEY})
        load = {"engine": "external", "model": "fake", "url": url}
        assert httpx.post(f"{process.url}/v1/model/load", json=load, headers=AUTH, timeout=30).status_code == 200
        yield process


def _post(sidecar: SidecarProcess, raw: bytes) -> httpx.Response:
    headers = AUTH | {"content-type": "application/json"}
    return httpx.post(f"{sidecar.url}{CHAT}", content=raw, headers=headers, timeout=30)


def test_a_stream_reaches_the_engine_as_the_client_wrote_it_with_the_usage_request_added(
    sidecar: SidecarProcess,
) -> None:
    # Spacing, key order, escapes and a number Python would write differently: all kept as they were.
    raw = b'{ "model" : "fake",\n "messages": [{"role": "user", "content": "caf\\u00e9 \xe2\x98\x95"}],\n' + (
        b' "temperature": 1.0E0, "stream": true }\n'
    )
    response = _post(sidecar, raw)
    assert response.status_code == 200, response.text
    assert '"usage"' not in response.text  # the client did not ask for it: the chunk is taken out again
    sent = _Recording.bodies[-1]
    assert sent == raw[: raw.rfind(b"}")] + b',"stream_options":{"include_usage":true}}\n'
    assert json.loads(sent) == json.loads(raw) | {"stream_options": {"include_usage": True}}


@pytest.mark.parametrize(
    "body",
    [
        {"model": "fake", "messages": [], "stream": True, "stream_options": {"include_usage": False}},
        {"model": "fake", "messages": [], "stream": True, "stream_options": {}},
    ],
)
def test_stream_options_of_the_clients_own_are_kept_and_usage_asked_for(
    sidecar: SidecarProcess, body: dict[str, Any]
) -> None:
    response = _post(sidecar, json.dumps(body).encode())
    assert response.status_code == 200, response.text
    assert json.loads(_Recording.bodies[-1])["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32-le", "utf-8-sig"])
def test_a_body_in_utf16_or_with_a_byte_order_mark_is_sent_on_as_utf8_json(
    sidecar: SidecarProcess, encoding: str
) -> None:
    body = {"model": "fake", "messages": [{"role": "user", "content": "é"}], "stream": True}
    response = _post(sidecar, json.dumps(body).encode(encoding))
    assert response.status_code == 200, response.text
    assert json.loads(_Recording.bodies[-1].decode("utf-8")) == body | {"stream_options": {"include_usage": True}}


def test_a_body_the_client_asked_usage_in_is_sent_unchanged(sidecar: SidecarProcess) -> None:
    raw = b'{"model": "fake", "messages": [], "stream": true, "stream_options": {"include_usage": true}}'
    response = _post(sidecar, raw)
    assert response.status_code == 200, response.text
    assert _Recording.bodies[-1] == raw
