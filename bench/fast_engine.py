"""`python -m bench.fast_engine`: a fake OpenAI streaming engine cheap enough per event to measure a proxy against.

The project's mock engine is a Starlette app: at a few hundred streams it is slower than the sidecar, so a bench
in front of it measures the mock. This one is a raw asyncio protocol on uvloop: requests parsed by hand, every
event encoded once at start-up, and one timer per millisecond that writes the events falling due in it (streams
are bucketed by the tick of their next event), so its cost per relayed event is a `write` and little else.
`--workers N` runs N processes on one port (SO_REUSEPORT).

Routes: `GET /health`, `GET /v1/models`, `POST /v1/chat/completions` (streamed when `"stream": true`, with a
usage chunk when `stream_options.include_usage`; `max_tokens` tokens, else `--tokens`; a non-streamed request gets
the whole answer at once), `POST /v1/embeddings` (an embedding of `--embedding-dims` values for each input, at once,
as vLLM writes it: floats, or base64 with `"encoding_format": "base64"`; each answer encoded once, the first time
it is asked for). As with the mock engine, a request's `"mock": {"tokens", "ttft_ms", "itl_ms"}` overrides them.
Keep-alive; one request at a time per connection, as HTTP/1.1 clients send them.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import re
import signal
import struct
import sys
import time
from collections import defaultdict
from typing import Any, cast

import uvloop

_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)
_TICK_S = 0.001
ENGINE_TTFT_FIELD = "engine_ttft_us"


def _ticks(ms: float) -> int:
    return max(1, round(ms / 1000 / _TICK_S))


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _sse(event: dict[str, Any]) -> bytes:
    return _chunked(b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n")


def _response(status: bytes, content_type: bytes, body: bytes) -> bytes:
    head = b"HTTP/1.1 " + status + b"\r\ncontent-type: " + content_type + b"\r\ncontent-length: "
    return head + str(len(body)).encode() + b"\r\n\r\n" + body


class Engine:
    """The answers, encoded once, and the clock that paces every stream."""

    def __init__(self, model: str, tokens: int, ttft_ms: float, itl_ms: float, embedding_dims: int = 1024) -> None:
        self.model = model
        self.tokens = tokens
        self.embedding_dims = embedding_dims
        self.embeddings: dict[tuple[int, bool], bytes] = {}  # answers by (inputs, base64)
        self.ttft_ticks = _ticks(ttft_ms)
        self.itl_ticks = _ticks(itl_ms)
        base = {"id": "chatcmpl-fast", "object": "chat.completion.chunk", "created": 0, "model": model}
        self.role = _sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        self.token_choices = [{"index": 0, "delta": {"content": "tok "}, "finish_reason": None}]
        self.token = _sse({**base, "choices": self.token_choices})
        self.finish = _sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
        self.base = base
        self.done = _chunked(b"data: [DONE]\n\n") + b"0\r\n\r\n"
        self.stream_head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        self.models = _response(
            b"200 OK", b"application/json", json.dumps({"object": "list", "data": [{"id": model}]}).encode()
        )
        self.health = _response(b"200 OK", b"application/json", b"{}")
        self.not_found = _response(b"404 Not Found", b"application/json", b'{"error": {"message": "not found"}}')
        self.buckets: defaultdict[int, list[Stream]] = defaultdict(list)
        self.tick = 0
        self.started = time.monotonic()

    def first_token(self, ttft_ns: int) -> bytes:
        """The first token's event, with the engine's own TTFT: the bench subtracts it from what the client saw,
        so that the 1 ms clock that paces the streams does not blur the TTFT a proxy adds."""
        return _sse({**self.base, ENGINE_TTFT_FIELD: ttft_ns // 1000, "choices": self.token_choices})

    def usage(self, tokens: int) -> bytes:
        usage = {"prompt_tokens": 8, "completion_tokens": tokens, "total_tokens": 8 + tokens}
        return _sse({**self.base, "choices": [], "usage": usage})

    def whole(self, tokens: int) -> bytes:
        message = {"role": "assistant", "content": "tok " * tokens}
        body = {
            **self.base,
            "object": "chat.completion",
            "choices": [{"index": 0, "message": message, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 8, "completion_tokens": tokens, "total_tokens": 8 + tokens},
        }
        return _response(b"200 OK", b"application/json", json.dumps(body).encode())

    def embedding(self, inputs: int, as_base64: bool) -> bytes:
        """The answer to an embeddings request of `inputs` inputs, in vLLM's shape (`usage` last, compact JSON),
        each value a float32's, as a model's are."""
        key = (inputs, as_base64)
        if key not in self.embeddings:
            packed = struct.pack(
                f"<{self.embedding_dims}f", *(random.uniform(-0.1, 0.1) for _ in range(self.embedding_dims))
            )
            vector: object = (
                base64.b64encode(packed).decode()
                if as_base64
                else list(struct.unpack(f"<{self.embedding_dims}f", packed))
            )
            data = [{"index": index, "object": "embedding", "embedding": vector} for index in range(inputs)]
            usage = {"prompt_tokens": 8 * inputs, "total_tokens": 8 * inputs, "completion_tokens": 0}
            body = {
                "id": "embd-fast",
                "object": "list",
                "created": 0,
                "model": self.model,
                "data": data,
                "usage": usage,
            }
            self.embeddings[key] = _response(
                b"200 OK", b"application/json", json.dumps(body, separators=(",", ":")).encode()
            )
        return self.embeddings[key]

    def schedule(self, stream: Stream, ticks: int) -> None:
        self.buckets[self.tick + ticks].append(stream)

    def run_clock(self, loop: asyncio.AbstractEventLoop) -> None:
        """Every tick, the events due in it; catching up on ticks a busy loop missed."""
        now_tick = int((time.monotonic() - self.started) / _TICK_S)
        while self.tick < now_tick:
            self.tick += 1
            for stream in self.buckets.pop(self.tick, ()):
                stream.step()
        loop.call_later(_TICK_S, self.run_clock, loop)


class Stream:
    def __init__(self, engine: Engine, transport: asyncio.Transport, tokens: int, usage: bool, itl_ticks: int) -> None:
        self.engine = engine
        self.itl_ticks = itl_ticks
        self.transport = transport
        self.left = tokens
        self.tokens = tokens
        self.usage = usage
        self.closed = False
        self.arrived_ns = time.perf_counter_ns()

    def step(self) -> None:
        if self.closed:
            return
        if self.left:
            first = self.left == self.tokens
            self.left -= 1
            if first:
                self.transport.write(self.engine.first_token(time.perf_counter_ns() - self.arrived_ns))
            else:
                self.transport.write(self.engine.token)
            if self.left:
                self.engine.schedule(self, self.itl_ticks)
                return
        tail = self.engine.finish + (self.engine.usage(self.tokens) if self.usage else b"") + self.engine.done
        self.transport.write(tail)
        self.closed = True


class Connection(asyncio.Protocol):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.stream: Stream | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's TCP transport (it sets TCP_NODELAY)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.stream is not None:
            self.stream.closed = True  # a client that left: its stream stops, as an engine aborts

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = self.buffer[:end]
            match = _CONTENT_LENGTH.search(head)
            length = int(match[1]) if match else 0
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            self.handle(head, body)

    def handle(self, head: bytes, body: bytes) -> None:
        assert self.transport is not None
        method, path = head.split(b" ", 2)[:2]
        engine = self.engine
        if method == b"GET" and path == b"/health":
            self.transport.write(engine.health)
        elif method == b"GET" and path == b"/v1/models":
            self.transport.write(engine.models)
        elif method == b"POST" and path == b"/v1/chat/completions":
            request = json.loads(body or b"{}")
            override = request.get("mock") or {}
            tokens = int(override.get("tokens") or request.get("max_tokens") or engine.tokens)
            if not request.get("stream"):
                self.transport.write(engine.whole(tokens))
                return
            usage = bool((request.get("stream_options") or {}).get("include_usage"))
            itl_ticks = _ticks(override["itl_ms"]) if "itl_ms" in override else engine.itl_ticks
            self.stream = Stream(engine, self.transport, tokens, usage, itl_ticks)
            self.transport.write(engine.stream_head + engine.role)
            engine.schedule(self.stream, _ticks(override["ttft_ms"]) if "ttft_ms" in override else engine.ttft_ticks)
        elif method == b"POST" and path == b"/v1/embeddings":
            request = json.loads(body or b"{}")
            inputs = request.get("input")
            count = len(inputs) if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int) else 1
            self.transport.write(engine.embedding(count, request.get("encoding_format") == "base64"))
        else:
            self.transport.write(engine.not_found)


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    engine = Engine(args.model, args.tokens, args.ttft_ms, args.itl_ms, args.embedding_dims)
    server = await loop.create_server(lambda: Connection(engine), "127.0.0.1", args.port, reuse_port=True, backlog=4096)
    engine.run_clock(loop)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fast_engine", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="mock-model")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per answer without max_tokens")
    parser.add_argument("--ttft-ms", type=float, default=20.0)
    parser.add_argument("--itl-ms", type=float, default=5.0)
    parser.add_argument("--embedding-dims", type=int, default=1024, help="values in each embedding (default 1024)")
    parser.add_argument("--workers", type=int, default=1, help="processes on the port (SO_REUSEPORT)")
    args = parser.parse_args(argv)
    children = []
    for _ in range(args.workers - 1):
        pid = os.fork()
        if pid == 0:  # a child serves until its SIGTERM
            uvloop.run(serve(args))
            return 0
        children.append(pid)
    try:
        uvloop.run(serve(args))
    finally:
        for pid in children:
            os.kill(pid, signal.SIGTERM)
            os.waitpid(pid, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
