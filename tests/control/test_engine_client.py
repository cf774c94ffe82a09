"""The supervisor's client to the engine: an answer's body bounded in size and, from its head, in time; only
identity encoding read."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator

import httpx
import pytest

from sidecar.control.engine_client import ENGINE_CONTROL_ANSWER_BYTES, AnswerRefused, BoundedAnswers, engine_client


class Body(httpx.AsyncByteStream):
    """An answer's body: `pieces` of bytes, then the end, or (`hang`) a wait that only the reader's going ends.
    It notes whether it was closed: what frees the engine's connection."""

    def __init__(self, *pieces: bytes, hang: bool = False) -> None:
        self.pieces, self.hang, self.closed = pieces, hang, False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for piece in self.pieces:
            yield piece
        if self.hang:
            await asyncio.Event().wait()

    async def aclose(self) -> None:
        self.closed = True


def client(body: Body, limit_bytes: int = 100, **headers: str) -> httpx.AsyncClient:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers=headers, stream=body)

    return httpx.AsyncClient(transport=BoundedAnswers(httpx.MockTransport(answer), limit_bytes), timeout=0.2)


async def test_an_answer_within_the_bound_is_read_whole() -> None:
    async with client(Body(b"x" * 60, b"y" * 40)) as engine:
        answer = await engine.get("http://engine/metrics")
    assert answer.content == b"x" * 60 + b"y" * 40


async def test_an_answer_past_the_bound_is_refused_and_its_body_closed() -> None:
    body = Body(b"x" * 60, b"y" * 60, b"z" * 60)
    async with client(body) as engine:
        with pytest.raises(AnswerRefused, match=r"answer to /metrics is larger than 100 bytes"):
            await engine.get("http://engine/metrics")
    assert body.closed


async def test_a_body_that_stops_coming_is_refused_at_the_calls_read_timeout_from_its_head() -> None:
    body = Body(b"x", hang=True)
    async with client(body) as engine:
        with pytest.raises(httpx.ReadTimeout, match=r"answer to /health was not complete in time"):
            await asyncio.wait_for(engine.get("http://engine/health"), 5)
    assert body.closed


async def test_a_call_without_a_read_timeout_has_no_deadline() -> None:
    async with client(Body(b"x", b"y")) as engine:
        answer = await engine.get("http://engine/v1/models", timeout=None)
    assert answer.content == b"xy"


@pytest.mark.parametrize("encoding", ["gzip", "br"])
async def test_an_answer_in_an_encoding_not_asked_for_is_refused(encoding: str) -> None:
    body = Body(gzip.compress(b"x" * 10_000))  # 10,000 bytes in under 100 compressed: the bound would not see them
    async with client(body, **{"Content-Encoding": encoding}) as engine:
        with pytest.raises(AnswerRefused, match=f"answered /metrics in {encoding} encoding"):
            await engine.get("http://engine/metrics")
    assert body.closed


async def test_the_supervisors_client_asks_for_identity_encoding_and_holds_the_bound() -> None:
    async with engine_client(None) as engine:
        assert engine.headers["accept-encoding"] == "identity"
        assert isinstance(engine._transport, BoundedAnswers)
        assert engine._transport.limit_bytes == ENGINE_CONTROL_ANSWER_BYTES
