from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator, Callable

import psutil
import pytest

from tests.apps import client_for
from tests.processes import SidecarProcess

# A generation route, which the app serves before its router with the limit checked as a call, and a route that
# goes through the middleware's layer.
PATHS = pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/embeddings"])


@PATHS
async def test_declared_length_over_limit_is_413_before_reading(path: str) -> None:
    async with client_for(max_body_bytes=100) as client:
        response = await client.post(path, content=b"x" * 101)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    assert response.headers["connection"] == "close"


async def _chunks(body: bytes, size: int) -> AsyncIterator[bytes]:
    """The body streamed without a declared length (chunked)."""
    for start in range(0, len(body), size):
        yield body[start : start + size]


@PATHS
async def test_streamed_body_over_limit_is_413(path: str) -> None:
    async with client_for(max_body_bytes=100) as client:
        response = await client.post(path, content=_chunks(b"x" * 500, 50))
    assert response.status_code == 413
    assert "100 bytes" in response.json()["error"]["message"]


@PATHS
async def test_body_at_the_limit_is_read(path: str) -> None:
    body = b'{"model": "m", "input": "x"}'
    async with client_for(max_body_bytes=len(body)) as client:
        declared = await client.post(path, content=body)
        streamed = await client.post(path, content=_chunks(body, 5))
    assert declared.status_code == streamed.status_code == 503  # read and parsed; no engine


async def test_invalid_content_length_is_400() -> None:
    async with client_for() as client:
        response = await client.post("/v1/chat/completions", content=b"{}", headers={"Content-Length": "12abc"})
    assert response.status_code == 400


def test_endless_chunked_body_gets_413_and_memory_stays_flat(start_sidecar: Callable[..., SidecarProcess]) -> None:
    """A client streams a chunked body far past the limit: the sidecar answers 413 and stops reading."""
    limit = 1024 * 1024
    sidecar = start_sidecar({"SIDECAR_MAX_BODY_BYTES": str(limit)})
    process = psutil.Process(sidecar.pid)
    rss_before = process.memory_info().rss

    chunk = b"x" * 65536
    framed = b"%x\r\n%s\r\n" % (len(chunk), chunk)
    sent = 0
    with socket.create_connection(("127.0.0.1", sidecar.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: sidecar\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        sock.settimeout(0.2)
        deadline = time.monotonic() + 20
        while sent < 256 * limit and time.monotonic() < deadline:
            try:
                sock.sendall(framed)
                sent += len(chunk)
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                break  # the sidecar stopped reading: it has answered
        sock.settimeout(10)
        response = b""
        closed_by_sidecar = False
        try:
            while data := sock.recv(65536):
                response += data
            closed_by_sidecar = True  # end of stream
        except ConnectionResetError:
            closed_by_sidecar = True

    status_line = response.split(b"\r\n", 1)[0]
    assert status_line == b"HTTP/1.1 413 Request Entity Too Large", response[:200]
    assert b'"code": "request_too_large"' in response
    assert closed_by_sidecar
    assert sent < 64 * limit, "the sidecar kept reading long after the limit"
    growth = process.memory_info().rss - rss_before
    assert growth < 16 * 1024 * 1024, f"RSS grew by {growth / 1e6:.1f} MB"
