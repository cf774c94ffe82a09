"""The garbage collector on a clock (`sidecar/server/garbage.py`), and what it relies on: no request of any kind,
its client gone or its engine failing included, leaves a reference cycle in the sidecar."""

from __future__ import annotations

import asyncio
import gc
import json
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from sidecar.server import garbage
from tests.processes import SidecarProcess, bearer, command_lines, wait_until
from tests.proxy.conftest import events

KEY = "garbage-test-key"
PROBE = Path(__file__).parent / "garbage_probe"


@pytest.fixture
def automatic_collection_off() -> Iterator[list[int]]:
    """Automatic collection off as `garbage.take_over` leaves it; the generations collected, in order."""
    collected: list[int] = []

    def record(phase: str, info: dict[str, Any]) -> None:
        if phase == "stop":
            collected.append(info["generation"])

    gc.disable()
    gc.callbacks.append(record)
    try:
        yield collected
    finally:
        gc.callbacks.remove(record)
        gc.enable()


class _Cycle:
    def __init__(self) -> None:
        self.me = self


async def test_a_cycle_is_freed_on_the_clock_and_every_nth_collection_is_full(
    automatic_collection_off: list[int],
) -> None:
    cycle = _Cycle()
    freed = weakref.ref(cycle)
    del cycle
    collecting = asyncio.create_task(garbage.collect_periodically(every_s=0.01, full_every=3))
    try:
        async with asyncio.timeout(10):
            while len(automatic_collection_off) < 6:
                await asyncio.sleep(0.01)
    finally:
        collecting.cancel()
    assert freed() is None
    assert automatic_collection_off[:6] == [1, 1, 2, 1, 1, 2]


class _Probe:
    """The garbage a sidecar process kept (tests/garbage_probe), counted by type on demand."""

    def __init__(self, directory: Path, pid: int) -> None:
        self.trigger = directory / f"{pid}.trigger"
        self.report = directory / f"{pid}.json"

    def count(self) -> Counter[str]:
        self.report.unlink(missing_ok=True)
        self.trigger.touch()
        wait_until(lambda: self.report.exists() and not self.trigger.exists(), timeout_s=10)
        return Counter(json.loads(self.report.read_text()))


def _error_code(answer: httpx.Response) -> str:
    """The error's code: of a JSON answer's body, or of the event that ended a stream cut after its status."""
    if answer.headers["content-type"].startswith("application/json"):
        return str(answer.json()["error"]["code"])
    *_, cut_by, done = events(answer.content)
    assert answer.status_code == 200 and done == b"data: [DONE]", answer.text
    return str(json.loads(cut_by.removeprefix(b"data: "))["error"]["code"])


def _every_kind_of_request(sidecar: SidecarProcess) -> None:
    """One request of each kind a client makes, ending every way a request ends."""
    key = bearer(KEY)
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    message = chat  # Anthropic's Messages API asks the same fields
    with httpx.Client(base_url=sidecar.url, headers=key, timeout=30) as client:
        answers = [
            client.post("/v1/chat/completions", json=chat),
            client.post("/v1/chat/completions", json=chat | {"stream": True}),
            client.post(
                "/v1/chat/completions", json=chat | {"stream": True, "stream_options": {"include_usage": True}}
            ),
            client.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 4, "stream": True}),
            client.post("/v1/embeddings", json={"model": "m", "input": "hi"}),
            client.get("/v1/models"),
            client.post("/v1/chat/completions", json=chat | {"mock": {"error": {"status": 500, "message": "boom"}}}),
            client.post(
                "/v1/chat/completions",
                json=chat | {"stream": True, "mock": {"error": {"status": 400, "message": "no"}}},
            ),
            client.post("/v1/chat/completions", content=b"not json"),
            client.post("/v1/chat/completions", json={"model": 3, "messages": "hi"}),
            client.post("/v1/chat/completions", json=chat, headers={"Authorization": "Bearer wrong-key-0000"}),
            httpx.post(f"{sidecar.url}/v1/chat/completions", json=chat),
            client.get("/v1/nothing-here"),
            client.post("/v1/messages", json=message),
            client.post("/v1/messages", json=message | {"stream": True}),
            client.post("/v1/messages", json=message | {"max_tokens": 0}),  # the engine's 400, as it wrote it
        ]
        # The engine's faults, each cutting an answer streamed and one assembled for a non-streaming client: it
        # drops the connection, it stops sending (the inter-token timeout), its answer is past the sidecar's bound.
        cut = [
            client.post("/v1/chat/completions", json=chat | {"stream": stream, "mock": {fault: 1}})
            for fault in ("drop_after", "stall_after")
            for stream in (False, True)
        ]
        cut.append(client.post("/v1/chat/completions", json=chat | {"n": 1000, "max_tokens": 1}))
        stalled = {"model": "m", "input": "hi", "max_output_tokens": 4, "mock": {"stall_after": 1}}
        cut += [client.post("/v1/responses", json=stalled | {"stream": stream}) for stream in (False, True)]
        stalled_message = client.post("/v1/messages", json=message | {"stream": True, "mock": {"stall_after": 1}})
        # A client that leaves mid-stream: the sidecar drops its connection to the engine.
        long = chat | {"stream": True, "max_tokens": 200, "mock": {"itl_ms": 20}}
        with client.stream("POST", "/v1/chat/completions", json=long) as leaving:
            next(leaving.iter_raw())
    assert [_error_code(answer) for answer in cut] == [
        "engine_error",
        "engine_error",
        "engine_timeout",
        "engine_timeout",
        "engine_answer_too_large",
        "engine_timeout",
        "engine_timeout",
    ]
    name, data = events(stalled_message.content)[-1].split(b"\n")
    assert name == b"event: error" and json.loads(data.removeprefix(b"data: "))["error"]["type"] == "timeout_error"
    assert [answer.status_code for answer in answers] == [
        200,
        200,
        200,
        200,
        200,
        200,
        500,
        400,
        400,
        400,
        403,
        401,
        404,
        200,
        200,
        400,
    ]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_no_kind_of_request_leaves_a_reference_cycle_in_the_sidecar(
    workers: str, tmp_path: Path, start_sidecar: Callable[..., SidecarProcess]
) -> None:
    """What the clock's collector relies on: a request's objects are freed when it ends, never left for the
    collector, in the process that owns the engine and in each data-plane worker. Not among these: what goes
    through httpx (a scrape of /metrics, which reads the engine's own; a control-plane request a worker forwards),
    whose closed connections and streamed answers are cycles of httpx's own, a few dozen objects each, seconds
    apart: the clock's collections free them."""
    probed = {"SIDECAR_API_KEYS": KEY, "PYTHONPATH": str(PROBE), "GARBAGE_PROBE_DIR": str(tmp_path)}
    # A stalled engine is cut after 0.3 s: sixty times the other answers' 5 ms between tokens, kept on a loaded machine.
    faults = {"SIDECAR_UPSTREAM_INTER_TOKEN_TIMEOUT_S": "0.3", "SIDECAR_MAX_ANSWER_BYTES": "20000"}
    # The engine loaded at start-up and the workers found among the sidecar's children, rather than by a load and
    # GET /v1/model: a worker forwards those to the supervisor's process through httpx, and the cycle its streamed
    # answer leaves appears once the connection idles out, within the counting.
    autoload = {"SIDECAR_AUTOLOAD_ENGINE": "mock", "SIDECAR_AUTOLOAD_MODEL": "m"}
    sidecar = start_sidecar(probed | faults | autoload | {"SIDECAR_WORKERS": workers})
    sidecar.wait_ready()
    children = command_lines(psutil.Process(sidecar.pid).children())
    worker_pids = [pid for pid, argv in children.items() if argv[2:4] == ["sidecar", "worker"]]
    assert len(worker_pids) == (0 if workers == "1" else 2)
    probes = [_Probe(tmp_path, pid) for pid in (sidecar.pid, *worker_pids)]
    _every_kind_of_request(sidecar)  # what is made once (caches, connections) made before counting
    before = [probe.count() for probe in probes]
    for _ in range(20):
        _every_kind_of_request(sidecar)
    assert [probe.count() - counted for probe, counted in zip(probes, before, strict=True)] == [Counter()] * len(probes)
