"""SIDECAR_WORKERS=2: two data-plane workers on one port, one supervisor owning the engine, all real processes.

Connections are spread over the workers by the kernel, so a test that needs each worker sends requests on new
connections until the records (`GET /v1/requests/{id}`, `"worker"`) show both served.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.processes import SidecarProcess, command_lines, group_members, wait_until

Start = Callable[..., SidecarProcess]
DATA_KEY = "workers-data-key-0123"
KEYS = {"SIDECAR_API_KEYS": DATA_KEY, "SIDECAR_ADMIN_KEYS": "workers-admin-key-4567"}
DATA = {"Authorization": "Bearer workers-data-key-0123", "Connection": "close"}  # a new connection each time
ADMIN = {"Authorization": "Bearer workers-admin-key-4567", "Connection": "close"}
WORKERS = {"SIDECAR_WORKERS": "2", "SIDECAR_LOG_FORMAT": "json", **KEYS}


def _chat(sidecar: SidecarProcess, request_id: str, **mock: Any) -> httpx.Response:
    return sidecar.chat(DATA_KEY, headers={"X-Request-ID": request_id, "Connection": "close"}, **mock)


def _record(sidecar: SidecarProcess, request_id: str) -> dict[str, Any]:
    answer = httpx.get(f"{sidecar.url}/v1/requests/{request_id}", headers=DATA, timeout=10)
    assert answer.status_code == 200, answer.text
    record: dict[str, Any] = answer.json()
    return record


def _workers(sidecar: SidecarProcess) -> dict[int, int]:
    """Worker index -> pid, as GET /v1/model says, each checked against the processes running `sidecar worker`."""
    listed = httpx.get(f"{sidecar.url}/v1/model", headers=ADMIN).json()["workers"]
    running = command_lines(psutil.Process(sidecar.pid).children())
    found = {}
    for worker in listed:
        command = running.get(worker["pid"], [])
        if command[2:5] == ["sidecar", "worker", str(worker["index"])]:
            found[worker["index"]] = worker["pid"]
    return found


def _served_by_both(sidecar: SidecarProcess, prefix: str) -> dict[int, str]:
    """Requests on new connections until each worker has served one: worker -> a request id it served."""
    served: dict[int, str] = {}
    for i in range(60):
        request_id = f"{prefix}-{i}"
        assert _chat(sidecar, request_id).status_code == 200
        served.setdefault(_record(sidecar, request_id)["worker"], request_id)
        if len(served) == 2:
            return served
    raise AssertionError(f"one worker served every request: {served}")


class Stream:
    """A streamed chat in a thread, on a connection of its own: which worker took it (its X-Sidecar-Worker
    header), then how it ended: "done" (whole, to [DONE]), "cut", or the transport error's name."""

    def __init__(self, sidecar: SidecarProcess, request_id: str, itl_ms: float) -> None:
        self.worker: int | None = None
        self.outcome: str | None = None
        self.started = threading.Event()
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
        body["mock"] = {"itl_ms": itl_ms}
        headers = DATA | {"X-Request-ID": request_id}
        self._thread = threading.Thread(target=self._run, args=(f"{sidecar.url}/v1/chat/completions", body, headers))
        self._thread.start()

    def _run(self, url: str, body: dict[str, Any], headers: dict[str, str]) -> None:
        try:
            with httpx.stream("POST", url, json=body, headers=headers, timeout=30) as response:
                self.worker = int(response.headers["x-sidecar-worker"])
                self.started.set()
                lines = list(response.iter_lines())
            self.outcome = "done" if "data: [DONE]" in lines else "cut"
        except httpx.TransportError as exc:
            self.outcome = type(exc).__name__
        finally:
            self.started.set()

    def join(self) -> str | None:
        self._thread.join(30)
        return self.outcome


def _streams_on_both(sidecar: SidecarProcess, prefix: str, itl_ms: float) -> list[Stream]:
    """Streams opened one after the other until each worker has at least one in flight."""
    streams: list[Stream] = []
    for i in range(40):
        stream = Stream(sidecar, f"{prefix}-{i}", itl_ms)
        assert stream.started.wait(10) and stream.worker is not None, stream.outcome
        streams.append(stream)
        if {s.worker for s in streams} == {0, 1}:
            return streams
    raise AssertionError("every stream went to one worker")


@pytest.fixture
def sidecar(start_sidecar: Start) -> SidecarProcess:
    started = start_sidecar(WORKERS)
    loaded = httpx.post(
        f"{started.url}/v1/model/load", json={"engine": "mock", "model": "m"}, headers=ADMIN, timeout=30
    )
    assert loaded.status_code == 200, loaded.text
    wait_until(lambda: len(_workers(started)) == 2, timeout_s=10)
    return started


def test_load_through_one_worker_stream_through_both_records_found_through_either(sidecar: SidecarProcess) -> None:
    served = _served_by_both(sidecar, "both")
    for request_id in served.values():  # asked on new connections: whichever worker answers finds it
        for _ in range(6):
            assert _record(sidecar, request_id)["id"] == request_id
    status = httpx.get(f"{sidecar.url}/v1/model", headers=ADMIN).json()
    assert status["state"] == "ready" and len(group_members(status["pid"])) >= 1
    # The calls between the processes answer only this run's token, never a client's guess at it.
    for headers in ({}, {"x-sidecar-internal": "guess"}, ADMIN):
        assert httpx.get(f"{sidecar.url}/internal/metrics", headers=headers).status_code == 404
        assert httpx.get(f"{sidecar.url}/internal/requests/{served[0]}", headers=headers).status_code == 404


def test_control_answers_forwarded_by_a_worker_have_one_date_and_their_length(sidecar: SidecarProcess) -> None:
    for _ in range(6):  # a new connection each: both workers forward some
        answer = httpx.get(f"{sidecar.url}/v1/model", headers=ADMIN, timeout=10)
        assert answer.status_code == 200, answer.text
        assert len(answer.headers.get_list("date")) == 1 and len(answer.headers.get_list("x-request-id")) == 1
        assert int(answer.headers["content-length"]) == len(answer.content)
        assert "transfer-encoding" not in answer.headers


def test_metrics_add_up_whichever_worker_is_scraped(sidecar: SidecarProcess) -> None:
    _served_by_both(sidecar, "metrics-warm")
    before = _chat_count(sidecar)
    for i in range(10):
        assert _chat(sidecar, f"metrics-{i}").status_code == 200
    for _ in range(6):  # each scrape on a new connection: either worker, the same totals
        assert _chat_count(sidecar) == before + 10
    text = httpx.get(f"{sidecar.url}/metrics", headers={"Connection": "close"}).text
    assert 'sidecar_engine_state{state="ready"} 1.0' in text  # the supervisor's series, once


def _chat_count(sidecar: SidecarProcess) -> float:
    text = httpx.get(f"{sidecar.url}/metrics", headers={"Connection": "close"}).text
    wanted = 'sidecar_requests_total{engine="mock",model="m",route="/v1/chat/completions",status="2xx"}'
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(wanted))


def test_every_worker_reaches_a_replaced_engine_with_the_key_of_its_start(sidecar: SidecarProcess) -> None:
    """Each start of the engine has a key of its own: a worker that kept the one before would get 401s."""
    _served_by_both(sidecar, "first-start")
    body = {"engine": "mock", "model": "m", "replace": True}
    replaced = httpx.post(f"{sidecar.url}/v1/model/load", json=body, headers=ADMIN, timeout=30)
    assert replaced.status_code == 200, replaced.text
    _served_by_both(sidecar, "second-start")


def test_unload_drains_both_workers_and_is_503_in_both_at_once(sidecar: SidecarProcess) -> None:
    streams = _streams_on_both(sidecar, "drain", itl_ms=400)  # 4 tokens: about 1.2 s each
    unloaded = httpx.post(f"{sidecar.url}/v1/model/unload", json={}, headers=ADMIN, timeout=30)
    assert unloaded.status_code == 200 and unloaded.json()["state"] == "idle"
    assert [s.join() for s in streams] == ["done"] * len(streams)  # whole: the engine stopped after them
    for i in range(8):  # on new connections, whichever worker takes them
        refused = _chat(sidecar, f"after-{i}")
        assert refused.status_code == 503 and refused.headers["retry-after"]


def test_a_killed_worker_comes_back_and_the_engine_is_untouched(sidecar: SidecarProcess) -> None:
    engine_pid = httpx.get(f"{sidecar.url}/v1/model", headers=ADMIN).json()["pid"]
    before = _workers(sidecar)
    streams = _streams_on_both(sidecar, "cut", itl_ms=500)  # about 1.5 s each
    os.kill(before[0], signal.SIGKILL)
    outcomes = {(s.worker, s.join()) for s in streams}
    assert {outcome for worker, outcome in outcomes if worker == 1} == {"done"}, outcomes  # the other finished
    killed = {outcome for worker, outcome in outcomes if worker == 0}
    assert killed and killed <= {"RemoteProtocolError", "ReadError"}, outcomes  # its clients got an error
    wait_until(lambda: _workers(sidecar).get(0) not in (None, before[0]), timeout_s=10)
    _served_by_both(sidecar, "after-kill")
    status = httpx.get(f"{sidecar.url}/v1/model", headers=ADMIN).json()
    assert (status["state"], status["pid"]) == ("ready", engine_pid)
    exits = [json.loads(line) for line in sidecar.output().splitlines() if '"worker_exited"' in line]
    assert exits and exits[0]["worker"] == 0 and exits[0]["exit_code"] == -signal.SIGKILL


def test_sigterm_stops_the_workers_then_the_engine_and_leaves_nothing(sidecar: SidecarProcess) -> None:
    engine_pid = httpx.get(f"{sidecar.url}/v1/model", headers=ADMIN).json()["pid"]
    workers = _workers(sidecar)
    answers: list[httpx.Response] = []
    streaming = threading.Thread(target=lambda: answers.append(_chat(sidecar, "last", itl_ms=300)))
    streaming.start()
    wait_until(lambda: "sidecar_requests_active 1.0" in httpx.get(f"{sidecar.url}/metrics").text, timeout_s=10)
    started = time.monotonic()
    sidecar.process.send_signal(signal.SIGTERM)
    sidecar.wait_exit(30)
    streaming.join(10)
    assert time.monotonic() - started < 15
    assert answers and answers[0].status_code == 200  # drained, not cut
    assert group_members(engine_pid) == []
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie" for pid in workers.values())
    assert list(Path("/tmp/sidecar").glob(f"sidecar-{sidecar.port}*")) == []  # sockets and shared state
    lines = [json.loads(line) for line in sidecar.output().splitlines() if line.startswith("{")]
    order = [line["event"] for line in lines if line.get("event") in ("model_unload", "sidecar_stopped")]
    assert order == ["model_unload", "sidecar_stopped"]


@pytest.mark.parametrize("value", ["0", "lots", "65"])
def test_a_bad_workers_setting_stops_start_up_with_one_line(value: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")} | {"SIDECAR_WORKERS": value}
    ran = subprocess.run(
        [sys.executable, "-m", "sidecar", "serve"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30
    )
    assert ran.returncode == 2
    lines = (ran.stdout + ran.stderr).strip().splitlines()
    assert len(lines) == 1 and "SIDECAR_WORKERS" in lines[0]


def test_auto_the_default_is_half_the_cores_this_process_may_use() -> None:
    from sidecar.settings import auto_workers, load_settings, usable_cores

    assert load_settings(None, workers="auto").workers == auto_workers(usable_cores())
    assert load_settings(None).workers == auto_workers(usable_cores())  # unset: auto
    # One on the two cores where a second relayed no more; half of a larger share; never past 16.
    assert [auto_workers(cores) for cores in (1, 2, 3, 4, 16, 64)] == [1, 1, 1, 2, 8, 16]


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cpu.max": "max 100000\n"}, None),  # no quota: the affinity
        ({"cpu.max": "150000 100000\n"}, 2),  # 1.5 CPUs: 2 workers
        ({"cpu.max": "100000 100000\n"}, 1),
        ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),  # cgroup v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),  # no cgroup files at all
    ],
)
def test_auto_respects_the_containers_cpu_quota(tmp_path: Path, files: dict[str, str], expected: int | None) -> None:
    from sidecar.settings import usable_cores

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    affinity = len(os.sched_getaffinity(0))
    assert usable_cores(tmp_path) == (affinity if expected is None else min(affinity, expected))


async def test_a_worker_masks_what_the_supervisor_masks_for_the_engine_it_has_and_no_older_one(
    tmp_path: Path,
) -> None:
    """Unit: a worker's view of the engine (`EngineView`), its descriptions from a fake supervisor's process."""
    from engines.mock import MockAdapter
    from sidecar.control.engine import Engine, LoadRequest
    from sidecar.control.records import Described, EngineDescription
    from sidecar.control.shared import SharedState
    from sidecar.engine_state import EngineState
    from sidecar.redaction import MASK, Redactor
    from sidecar.settings import load_settings
    from sidecar.workers.view import EngineView

    def described(generation: int, key: str) -> bytes:
        request = LoadRequest(engine="mock", model="m", env={"HF_TOKEN": "load-env-secret"})
        masked = (*request.secrets(), key)
        engine = Engine(request, MockAdapter(), "http://127.0.0.1:1", 1, None, 0.0, 0.0, masked=masked)
        return Described(generation=generation, engine=EngineDescription.of(engine)).model_dump_json().encode()

    answers = {1: described(1, "first-start-key"), 2: described(2, "second-start-key")}
    shared = SharedState.create(tmp_path / "state", 1)
    supervisor = httpx.AsyncClient(
        transport=httpx.MockTransport(lambda _: httpx.Response(200, content=answers[shared.engine()[1]])),
        base_url="http://supervisor",
    )
    redactor = Redactor()
    view = EngineView(load_settings(None), shared, 0, supervisor, redactor)
    try:
        for generation, key in ((1, "first-start-key"), (2, "second-start-key")):
            shared.publish(EngineState.READY, generation, idle_unloaded=False)
            async with view.request_slot() as engine:
                assert engine.masked[-1] == key
            assert redactor.redact_text(f"{key} load-env-secret") == f"{MASK} {MASK}"
        assert redactor.redact_text("first-start-key") == "first-start-key"
    finally:
        await supervisor.aclose()
        shared.close()


def test_the_engines_live_output_streams_through_a_worker(sidecar: SidecarProcess) -> None:
    seen = threading.Event()

    def say() -> None:  # until the stream has it: the follower registers in the supervising process
        for i in range(40):
            if seen.is_set():
                return
            _chat(sidecar, f"say-{i}", log="said through a worker")
            time.sleep(0.25)

    speaker = threading.Thread(target=say)
    with httpx.stream("GET", f"{sidecar.url}/v1/model/logs?tail=0", headers=ADMIN, timeout=15) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        speaker.start()
        for line in response.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:]).get("line") == "said through a worker":
                seen.set()
                break
    speaker.join(15)
    assert seen.is_set()


def test_idle_unload_load_on_demand_and_sleep_hold_in_every_worker(start_sidecar: Start) -> None:
    sidecar = start_sidecar(WORKERS | {"SIDECAR_LOAD_ON_DEMAND": "true"})
    load = {"engine": "mock", "model": "m", "ttl_s": 2, "args": {"enable-sleep-mode": True}}
    first = httpx.post(f"{sidecar.url}/v1/model/load", json=load, headers=ADMIN, timeout=30).json()["pid"]
    wait_until(lambda: httpx.get(f"{sidecar.url}/v1/model", headers=ADMIN).json()["state"] == "idle", timeout_s=10)

    served = _served_by_both(sidecar, "on-demand")  # the first of them loaded the model again, for both workers
    status = httpx.get(f"{sidecar.url}/v1/model", headers=ADMIN).json()
    assert status["state"] == "ready" and status["pid"] != first
    assert any(_record(sidecar, request_id)["performance"]["queue_ms"] > 100 for request_id in served.values())

    assert httpx.post(f"{sidecar.url}/v1/model/sleep", headers=ADMIN, timeout=30).status_code == 200
    for i in range(6):  # whichever worker takes it
        refused = _chat(sidecar, f"asleep-{i}")
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "model_sleeping"
