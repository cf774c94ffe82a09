"""The supervisor's HTTP client to the engine: readiness probes, the engine's /metrics at a scrape, sleep and wake,
LoRA adapters. The engine's answers are untrusted input: each is bounded in size and, once its head is in, in
time, so that an engine (or whatever answers at an external engine's URL) that sends an endless body, or one a
byte at a time, costs a refused call rather than the sidecar's memory or a scrape that never ends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

from sidecar.http import tls_context

# The largest answer the supervisor reads from the engine. vLLM's /metrics, thousands of histogram lines, is a few
# hundred KB; a model list of 16 MiB would list some 50,000 adapters.
ENGINE_CONTROL_ANSWER_BYTES = 16 * 1024 * 1024


class AnswerRefused(httpx.TransportError):
    """An answer the supervisor will not read: past the size bound, or in an encoding it did not ask for. An
    `httpx.HTTPError`, so every caller treats it as an engine that did not answer."""


def engine_client(ca_file: Path | None, limit_bytes: int = ENGINE_CONTROL_ANSWER_BYTES) -> httpx.AsyncClient:
    """Each call on a connection of its own, closed after it: the calls are seconds apart, and httpx closes an
    expired idle connection only when the pool is next used, which would leave one open to the engine between
    them. Identity encoding asked for: a size bound on compressed bytes would not bound what they inflate to."""
    inner = httpx.AsyncHTTPTransport(verify=tls_context(ca_file), limits=httpx.Limits(max_keepalive_connections=0))
    return httpx.AsyncClient(
        transport=BoundedAnswers(inner, limit_bytes),
        timeout=httpx.Timeout(2.0),
        headers={"Accept-Encoding": "identity"},
    )


class BoundedAnswers(httpx.AsyncBaseTransport):
    """A transport whose answers' bodies are read within `limit_bytes` and within the call's read timeout from
    the head (httpx's own read timeout is per read: a body trickled a byte at a time never trips it)."""

    def __init__(self, inner: httpx.AsyncBaseTransport, limit_bytes: int) -> None:
        self.inner = inner
        self.limit_bytes = limit_bytes

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding != "identity":
            await response.aclose()
            raise AnswerRefused(f"the engine answered {request.url.path} in {encoding} encoding", request=request)
        read_timeout = request.extensions.get("timeout", {}).get("read")
        deadline = None if read_timeout is None else asyncio.get_running_loop().time() + read_timeout
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _BoundedBody(response.stream, request, self.limit_bytes, deadline)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


class _BoundedBody(httpx.AsyncByteStream):
    def __init__(self, body: httpx.AsyncByteStream, request: httpx.Request, limit: int, deadline: float | None):
        self.body, self.request, self.limit, self.deadline = body, request, limit, deadline

    async def __aiter__(self) -> AsyncIterator[bytes]:
        chunks = aiter(self.body)
        held = 0
        while True:
            try:
                async with asyncio.timeout_at(self.deadline):
                    chunk = await anext(chunks)
            except StopAsyncIteration:
                return
            except TimeoutError:
                said = f"the engine's answer to {self.request.url.path} was not complete in time"
                raise httpx.ReadTimeout(said, request=self.request) from None
            held += len(chunk)
            if held > self.limit:
                said = f"the engine's answer to {self.request.url.path} is larger than {self.limit} bytes"
                raise AnswerRefused(said, request=self.request)
            yield chunk

    async def aclose(self) -> None:
        await self.body.aclose()
