"""A sidecar at its open-files limit (sidecar/telemetry/resources.py), real processes with the limit set low: the soft
limit is raised to the hard one at start-up; a burst of clients past what the limit can serve is served up to it and the
rest answered 503 (before, the clients' own connections took every descriptor and not one request was served); a
request that finds no descriptor for its connection to the engine waits a moment for one, then gets a 503 that
does not blame the engine. And memory: what a burst of large prompts took is given back, and the bodies held at
once stay within SIDECAR_MAX_BODY_BYTES_IN_FLIGHT."""

from __future__ import annotations

import asyncio
import collections
import json
import resource
import select
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from sidecar.settings import load_settings
from sidecar.telemetry import resources
from sidecar.workers.pool import body_budget_share
from tests.processes import SidecarProcess, wait_until

KEY = "descriptors-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = "/v1/chat/completions"
LOW_LIMIT = 160  # (160 - 64 reserved) / 2: 48 connections served


def _chat(ttft_ms: int = 1) -> dict[str, Any]:
    return {
        "model": "mock-model",
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
        "mock": {"ttft_ms": ttft_ms, "itl_ms": 1},
    }


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Any]:
    started: list[SidecarProcess] = []

    def start(open_files: tuple[int, int], **env: str) -> SidecarProcess:
        process = SidecarProcess(
            tmp_path,
            {
                "SIDECAR_API_KEYS": KEY,
                "SIDECAR_AUTOLOAD_ENGINE": "mock",
                "SIDECAR_AUTOLOAD_MODEL": "mock-model",
                "SIDECAR_AUTOLOAD_ARGS": json.dumps({"tokens": 4}),
                **env,
            },
            open_files=open_files,
        )
        started.append(process)
        process.wait_healthy()
        process.wait_ready()
        return process

    yield start
    for process in started:
        process.stop()


def _overloaded(response: httpx.Response) -> None:
    """The sidecar's own refusal: 503, retry in a second, the OpenAI shape, not the engine's fault."""
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "1"
    error = response.json()["error"]
    assert error["code"] == "sidecar_overloaded" and error["type"] == "service_unavailable", error
    assert "open-files limit" in error["message"]


async def _burst(url: str, streams: int, ttft_ms: int = 1) -> tuple[int, list[httpx.Response], list[str]]:
    """That many streamed chats at once, each on its own connection: (answered whole, refused, failed to connect)."""
    served, refused, failed = 0, [], []
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, headers=AUTH, limits=limits, timeout=30) as client:

        async def one() -> None:
            nonlocal served
            try:
                response = await client.post(CHAT, json=_chat(ttft_ms))
            except httpx.TransportError as exc:  # reset as it was accepted, the sidecar having no descriptor for it
                failed.append(type(exc).__name__)
                return
            if response.status_code == 200 and response.text.rstrip().endswith("data: [DONE]"):
                served += 1
            else:
                refused.append(response)

        await asyncio.gather(*(one() for _ in range(streams)))
    return served, refused, failed


def test_the_soft_limit_is_raised_to_the_hard_one_and_the_engine_inherits_it(start: Any) -> None:
    hard = min(4096, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    sidecar = start((256, hard))
    assert psutil.Process(sidecar.pid).rlimit(psutil.RLIMIT_NOFILE) == (hard, hard)
    line = next(line for line in sidecar.output().splitlines() if "open_files_limit" in line)
    assert "[info" in line and f"limit={hard} " in line and "raised_from=256" in line, line
    engine_pid = httpx.get(f"{sidecar.url}/v1/model", headers=AUTH).json()["pid"]
    assert psutil.Process(engine_pid).rlimit(psutil.RLIMIT_NOFILE) == (hard, hard)


def test_a_burst_past_the_limit_is_served_up_to_it_and_the_rest_refused(start: Any) -> None:
    sidecar = start((LOW_LIMIT, LOW_LIMIT))
    assert "open_files_limit_low" in sidecar.output() and "streams_at_most=48" in sidecar.output()

    # Each stream held for 2 s: every connection of the burst arrives while the first 48 are still served.
    served, refused, failed = asyncio.run(_burst(sidecar.url, 150, ttft_ms=2000))
    assert 24 <= served <= 48, (served, len(refused), collections.Counter(failed))
    assert refused, "the connections past the limit are answered"
    for response in refused:
        _overloaded(response)
    assert served + len(refused) + len(failed) == 150

    # Nothing is left over: the next requests are served as before, the engine untouched.
    served, refused, failed = asyncio.run(_burst(sidecar.url, 20))
    assert (served, refused, failed) == (20, [], [])
    model = httpx.get(f"{sidecar.url}/v1/model", headers=AUTH).json()
    assert model["state"] == "ready" and model["restarts"] == 0
    # One warning for the whole burst (at most one every 5 s), not one a refusal.
    assert 1 <= sidecar.output().count("connections_over_limit") <= 2


def _fill(sidecar: SidecarProcess) -> list[socket.socket]:
    """Connections that send nothing (accepted, so each holds a descriptor, but never served) until the sidecar has
    none left and closes what it accepts at once."""
    held: list[socket.socket] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        batch = [socket.create_connection(("127.0.0.1", sidecar.port), timeout=5) for _ in range(10)]
        held += batch
        closed, _, _ = select.select(batch, [], [], 0.3)  # readable: at its end, closed by the sidecar
        if closed:
            return held
    raise AssertionError("the sidecar kept accepting connections past its open-files limit")


def _send_chat(sock: socket.socket) -> None:
    body = json.dumps(_chat()).encode()
    head = (
        f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)


def _read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one answer on a kept-alive connection (the body whole, or to the stream's end)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    if "content-length" in headers:
        while len(rest) < int(headers["content-length"]):
            rest += sock.recv(65536)
    else:  # chunked: to its last chunk
        while not rest.endswith(b"0\r\n\r\n"):
            rest += sock.recv(65536)
    return int(lines[0].split()[1]), headers, rest


def test_no_descriptor_for_the_engine_waits_for_one_then_is_a_503(start: Any) -> None:
    sidecar = start((LOW_LIMIT, LOW_LIMIT), SIDECAR_CLIENT_TIMEOUT_S="30")
    first, second = (socket.create_connection(("127.0.0.1", sidecar.port), timeout=15) for _ in range(2))
    held = _fill(sidecar)
    try:
        # No descriptor comes free: after a second's wait, a 503 the client may retry, not a 502.
        began = time.monotonic()
        _send_chat(first)
        status, headers, body = _read_answer(first)
        waited = time.monotonic() - began
        _overloaded(httpx.Response(status, headers=headers, content=body))
        assert waited >= 0.9, waited
        wait_until(lambda: "open_files_exhausted" in sidecar.output(), timeout_s=5)

        # One comes free while it waits (clients leave): the request goes through.
        _send_chat(second)
        time.sleep(0.2)  # a head start: no event can say it waits (the sidecar has no descriptor to tell anyone)
        for sock in held[:20]:
            sock.close()
        status, _, body = _read_answer(second)
        assert status == 200 and b"data: [DONE]" in body, body[-300:]
    finally:
        for sock in held + [first, second]:
            sock.close()
    assert httpx.post(f"{sidecar.url}{CHAT}", json=_chat(), headers=AUTH, timeout=10).status_code == 200


def test_memory_taken_by_a_burst_of_large_prompts_is_given_back(start: Any) -> None:
    """Each large body is held (read, parsed, written again) while its request is in flight; after them the
    sidecar's memory comes back down. glibc kept it in the heap: 32 bodies of 15 MB left 1,040 MB behind."""
    sidecar = start((LOW_LIMIT, LOW_LIMIT))
    process = psutil.Process(sidecar.pid)
    chat = _chat(ttft_ms=500) | {"messages": [{"role": "user", "content": "x" * 8_000_000}]}
    body = json.dumps(chat).encode()
    before = process.memory_info().rss

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=sidecar.url, headers=AUTH, timeout=60) as client:
            answers = await asyncio.gather(*(client.post(CHAT, content=body) for _ in range(12)))
        return [answer.status_code for answer in answers]

    assert asyncio.run(burst()) == [200] * 12
    # The bodies were 96 MB in all: what stays is the sidecar's own, not theirs.
    wait_until(lambda: process.memory_info().rss - before < 40 * 1024 * 1024, timeout_s=10)


def test_malloc_thresholds_are_set_where_the_environment_leaves_them_to_the_sidecar(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Large blocks mapped and unmapped (128 KiB up), 16 MiB of the heap's free top kept; an operator's own
    MALLOC_*_ variable, which glibc read at start-up, stands."""
    calls: list[tuple[int, int]] = []

    class _Libc:
        def mallopt(self, parameter: int, value: int) -> int:
            calls.append((parameter, value))
            return 1

    monkeypatch.setattr(resources.ctypes, "CDLL", lambda name: _Libc())
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    resources.set_malloc_thresholds()
    assert calls == [(-3, 128 * 1024), (-1, 16 * 1024 * 1024)]  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    calls.clear()
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    resources.set_malloc_thresholds()
    assert calls == [(-3, 128 * 1024)]


def test_bodies_past_the_budget_for_bodies_in_flight_are_refused_until_there_is_room(start: Any) -> None:
    """Two prompts of 900 KB in flight, of a budget of 2.5 MB: a third is refused before its body is read, with
    its length declared or not, while a small one still fits; once the two have ended the third is served."""
    sidecar = start((4096, 4096), SIDECAR_MAX_BODY_BYTES="1000000", SIDECAR_MAX_BODY_BYTES_IN_FLIGHT="2500000")
    held = json.dumps(_chat(ttft_ms=3000) | {"messages": [{"role": "user", "content": "x" * 900_000}]}).encode()
    third = json.dumps(_chat() | {"messages": [{"role": "user", "content": "x" * 900_000}]}).encode()

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted as it comes
        for start_at in range(0, len(third), 100_000):
            yield third[start_at : start_at + 100_000]

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=sidecar.url, headers=AUTH, timeout=30) as client:
            first_two = [asyncio.create_task(client.post(CHAT, content=held)) for _ in range(2)]
            deadline = time.monotonic() + 10
            while "sidecar_requests_active 2.0" not in (await client.get("/metrics")).text:
                assert time.monotonic() < deadline, "the two prompts were not both admitted"
                await asyncio.sleep(0.02)
            for refused in (await client.post(CHAT, content=third), await client.post(CHAT, content=chunked())):
                assert refused.status_code == 503, refused.text
                assert refused.headers["retry-after"] == "1"
                error = refused.json()["error"]
                assert error["code"] == "sidecar_overloaded" and "MAX_BODY_BYTES_IN_FLIGHT" in error["message"]
            assert (await client.post(CHAT, json=_chat())).status_code == 200  # a small body fits beside them
            assert [answer.status_code for answer in await asyncio.gather(*first_two)] == [200, 200]
            assert (await client.post(CHAT, content=third)).status_code == 200
            assert (await client.post(CHAT, content=chunked())).status_code == 200

    asyncio.run(scenario())
    assert "body_bytes_in_flight_full" in sidecar.output()


def test_each_data_plane_worker_holds_its_share_of_the_bodies_in_flight() -> None:
    settings = load_settings(None, workers=4, max_body_bytes_in_flight=1 << 30)
    assert body_budget_share(settings) == 1 << 28
    small = load_settings(None, workers=4, max_body_bytes_in_flight=20 << 20, max_body_bytes=16 << 20)
    assert body_budget_share(small) == 16 << 20  # never less than one largest body
    assert body_budget_share(load_settings(None, workers=4, max_body_bytes_in_flight=0)) == 0  # no limit
    assert body_budget_share(load_settings(None, max_body_bytes_in_flight=5 << 30)) == 5 << 30  # one process: all
