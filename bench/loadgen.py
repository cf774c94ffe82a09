"""Streaming chat load: many concurrent clients, each timing TTFT and counting chunks, with as little work as
possible per chunk so that the generator is not what gets measured."""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

import aiohttp
import uvloop

from bench.fast_engine import ENGINE_TTFT_FIELD
from sidecar.dataplane.chunks import has_output

_ENGINE_TTFT = re.compile(rb'"' + ENGINE_TTFT_FIELD.encode() + rb'":(\d+)')


@dataclass
class PhaseResult:
    """One target at one concurrency for one phase of the run."""

    target: str
    concurrency: int
    seconds: float = 0.0
    requests: int = 0
    chunks: int = 0
    errors: int = 0
    ttfts_ms: list[float] = field(default_factory=list)
    # Each TTFT less the engine's own, where the engine says it (bench/fast_engine.py): what the path added.
    path_ttfts_ms: list[float] = field(default_factory=list)
    first_error: str | None = None

    @property
    def chunks_per_s(self) -> float:
        return self.chunks / self.seconds if self.seconds else 0.0


_TURN = ("The quick brown fox jumps over the lazy dog; the proxy relays every word of it back. " * 6)[:470]


def chat_body(
    tokens: int,
    prompt: str = "measure the proxy",
    model: str = "mock-model",
    mock: bool = False,
    history: int = 0,
    extra: dict[str, object] | None = None,
) -> bytes:
    """A streamed chat request for `tokens` tokens (`mock`: also raises the mock engine's own cap to them), after
    a conversation of about `history` bytes in turns of 500 (what a chat client sends back each time), with the
    `extra` fields an engine takes (vLLM's `ignore_eos`, for a random model that would stop at any token)."""
    turns = [{"role": "user" if index % 2 == 0 else "assistant", "content": _TURN} for index in range(history // 500)]
    body: dict[str, object] = {
        "model": model,
        "messages": [*turns, {"role": "user", "content": prompt}],
        "stream": True,
        "max_tokens": tokens,
    }
    if mock:
        body["mock"] = {"tokens": tokens}
    body |= extra or {}
    return json.dumps(body).encode()


async def _post(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]
) -> aiohttp.ClientResponse:
    try:
        return await session.post(url, data=body, headers=headers)
    except aiohttp.ClientConnectorError:
        raise
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
        # A pooled connection the server closed as it was reused (llama-server does it often): the server never
        # took the request, so it goes once more, as the sidecar and client libraries do.
        return await session.post(url, data=body, headers=headers)


async def stream_once(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str], result: PhaseResult
) -> None:
    """One streamed request: its TTFT (first chunk with output) and its chunk count go into result."""
    started = time.perf_counter()
    ttft = None
    engine_ttft = None
    chunks = 0
    tail = b""
    try:
        async with await _post(session, url, body, headers) as response:
            if response.status != 200:
                raise RuntimeError(f"status {response.status}: {(await response.read())[:200]!r}")
            async for data in response.content.iter_any():
                if ttft is None and has_output(data):
                    ttft = time.perf_counter() - started
                    if said := _ENGINE_TTFT.search(data):
                        engine_ttft = int(said[1]) / 1e6
                chunks += data.count(b"data: ")
                tail = (tail + data)[-32:]
        if not tail.endswith(b"data: [DONE]\n\n") or ttft is None:
            raise RuntimeError(f"stream ended early after {chunks} chunks")
    except (aiohttp.ClientError, RuntimeError, TimeoutError) as exc:
        result.errors += 1
        result.first_error = result.first_error or f"{exc.__class__.__name__}: {exc}"
        return
    result.requests += 1
    result.chunks += chunks
    result.ttfts_ms.append(ttft * 1000)
    if engine_ttft is not None:
        result.path_ttfts_ms.append((ttft - engine_ttft) * 1000)


async def run_phase(
    session: aiohttp.ClientSession,
    target: str,
    url: str,
    headers: dict[str, str],
    body: bytes,
    concurrency: int,
    seconds: float,
) -> PhaseResult:
    """`concurrency` clients stream back to back for `seconds`; each finishes the request it is in."""
    result = PhaseResult(target, concurrency)
    result.seconds = await back_to_back(lambda: stream_once(session, url, body, headers, result), concurrency, seconds)
    return result


async def back_to_back(request: Callable[[], Awaitable[None]], concurrency: int, seconds: float) -> float:
    """`concurrency` clients each sending `request` again as soon as it ends, for `seconds`, each finishing the one it
    is in: the seconds that took."""
    started = time.perf_counter()
    deadline = started + seconds

    async def client() -> None:
        while time.perf_counter() < deadline:
            await request()

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return time.perf_counter() - started


def new_session(concurrency: int) -> aiohttp.ClientSession:
    # Idle connections go before the servers' own 5 s keep-alive would close them under a request.
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=4)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120), auto_decompress=False)


class LoadProcesses:
    """The same load from several processes, each with its own event loop and connections, the streams shared
    out between them: one loop of this client reads some 100k chunks/s, less than several sidecar workers relay.
    Its phases start together and are merged into one result."""

    def __init__(self, count: int) -> None:
        context = multiprocessing.get_context("spawn")  # no copy of the bench's loop, sessions or threads
        self._pipes: list[Connection] = []
        self._processes = []
        for _ in range(count):
            ours, theirs = context.Pipe()
            process = context.Process(target=_serve_phases, args=(theirs,), daemon=True)
            process.start()
            self._pipes.append(ours)
            self._processes.append(process)

    async def run_phase(
        self, target: str, url: str, headers: dict[str, str], body: bytes, concurrency: int, seconds: float
    ) -> PhaseResult:
        count = len(self._pipes)
        shares = [concurrency // count + (index < concurrency % count) for index in range(count)]
        busy = [(pipe, share) for pipe, share in zip(self._pipes, shares, strict=True) if share]
        for pipe, share in busy:
            pipe.send((target, url, headers, body, share, seconds))
        loop = asyncio.get_running_loop()
        parts: list[PhaseResult] = await asyncio.gather(*(loop.run_in_executor(None, pipe.recv) for pipe, _ in busy))
        merged = PhaseResult(target, concurrency, seconds=max(part.seconds for part in parts))
        for part in parts:
            merged.requests += part.requests
            merged.chunks += part.chunks
            merged.errors += part.errors
            merged.ttfts_ms += part.ttfts_ms
            merged.path_ttfts_ms += part.path_ttfts_ms
            merged.first_error = merged.first_error or part.first_error
        return merged

    def close(self) -> None:
        for pipe in self._pipes:
            with contextlib.suppress(OSError):  # one that died already
                pipe.send(None)
        for process in self._processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()


def _serve_phases(pipe: Connection) -> None:
    """One load process: the phases it is sent, on one session kept between them, until it is sent None."""

    async def serve() -> None:
        async with new_session(0) as session:
            while (phase := await asyncio.to_thread(pipe.recv)) is not None:
                pipe.send(await run_phase(session, *phase))

    uvloop.run(serve())
