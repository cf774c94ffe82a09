"""GET /v1/model/logs: the engine's output as it comes, with the real sidecar and the mock engine as processes."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.processes import SidecarProcess, engine_key, wait_until

Start = Callable[..., SidecarProcess]
ADMIN_KEY = "logs-admin-key-0123"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
DATA = {"Authorization": "Bearer logs-data-key-4567"}
KEYS = {"SIDECAR_ADMIN_KEYS": "logs-admin-key-0123", "SIDECAR_API_KEYS": "logs-data-key-4567"}
SECRET = "hf_logs_secret_0123456789"


def _load(sidecar: SidecarProcess, **body: Any) -> httpx.Response:
    request = {"engine": "mock", "model": "m", "env": {"HF_TOKEN": SECRET}, "args": {"print-env": "HF_TOKEN"}}
    return httpx.post(f"{sidecar.url}/v1/model/load", json=request | body, headers=ADMIN, timeout=30)


def _say(sidecar: SidecarProcess, line: str, repeat: int = 1) -> None:
    """The mock engine prints `line` (`repeat` times) when it gets this request, as an engine logs its requests."""
    mock = {"log": line, "log_repeat": repeat}
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "mock": mock}
    httpx.post(f"{sidecar.url}/v1/chat/completions", json=body, headers=DATA, timeout=10).raise_for_status()


class Follower:
    """A client of the log stream in a thread: the events it read, (name, data), and the raw bytes."""

    def __init__(self, sidecar: SidecarProcess, query: str = "") -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.raw = b""
        self.status: int | None = None
        self.done = threading.Event()
        self._socket: socket.socket | None = None
        self._opened = threading.Event()
        self._client = httpx.Client(timeout=httpx.Timeout(30, read=60))
        self._url = f"{sidecar.url}/v1/model/logs{query}"
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            with self._client.stream("GET", self._url, headers=ADMIN) as response:
                self.status = response.status_code
                self._socket = response.extensions["network_stream"].get_extra_info("socket")
                self._opened.set()
                for event in _events(response.iter_raw(), self):
                    self.events.append(event)
        except httpx.HTTPError:
            pass
        finally:
            self.done.set()

    def lines(self) -> list[str]:
        return [data["line"] for name, data in self.events if name == "message"]

    def close(self) -> None:
        """Leave as a client that goes away does: the connection shut, whatever the reading thread is doing."""
        if self._opened.wait(5) and self._socket is not None:
            with contextlib.suppress(OSError):
                self._socket.shutdown(socket.SHUT_RDWR)
        self.done.wait(5)
        self._client.close()


def _events(chunks: Iterator[bytes], follower: Follower) -> Iterator[tuple[str, dict[str, Any]]]:
    buffer = b""
    for chunk in chunks:
        follower.raw += chunk
        buffer += chunk
        while b"\n\n" in buffer:
            block, buffer = buffer.split(b"\n\n", 1)
            fields = dict(line.split(": ", 1) for line in block.decode().splitlines() if not line.startswith(":"))
            if "data" in fields:
                yield fields.get("event", "message"), json.loads(fields["data"])


def test_the_kept_tail_then_each_line_as_it_comes_masked_then_the_end(start_sidecar: Start) -> None:
    sidecar = start_sidecar(KEYS)
    assert _load(sidecar).status_code == 200
    follower = Follower(sidecar)
    try:
        wait_until(lambda: any("mock engine sees HF_TOKEN=" in line for line in follower.lines()), timeout_s=10)
        assert sidecar.status(ADMIN_KEY)["log_followers"] == 1
        _say(sidecar, f"request one carries {SECRET} in its line")
        _say(sidecar, "request two")
        wait_until(lambda: "request two" in follower.lines(), timeout_s=10)
        lines = follower.lines()
        assert lines.index("request one carries *** in its line") < lines.index("request two")
        assert [e for e in follower.events if e[0] == "message"][-1][1]["stream"] == "stdout"

        assert httpx.post(f"{sidecar.url}/v1/model/unload", json={}, headers=ADMIN, timeout=30).status_code == 200
        assert follower.done.wait(10), "the stream ends with the engine's output"
        name, data = follower.events[-1]
        assert name == "end" and data["exit_code"] is not None
        assert SECRET.encode() not in follower.raw
        assert SECRET not in sidecar.output()
    finally:
        follower.close()


def test_tail_chooses_how_much_of_the_kept_output_comes_first(start_sidecar: Start) -> None:
    sidecar = start_sidecar(KEYS)
    assert _load(sidecar).status_code == 200
    follower = Follower(sidecar, "?tail=0")
    try:
        wait_until(lambda: sidecar.status(ADMIN_KEY)["log_followers"] == 1, timeout_s=10)
        _say(sidecar, "only this one")
        wait_until(lambda: follower.lines() != [], timeout_s=10)
        assert follower.lines() == ["only this one"]
    finally:
        follower.close()
    with httpx.stream("GET", f"{sidecar.url}/v1/model/logs?tail=1", headers=ADMIN, timeout=10) as response:
        first = next(response.iter_lines())
        assert json.loads(first.removeprefix("data: "))["line"] == "only this one"


def test_a_client_that_leaves_is_let_go_at_once(start_sidecar: Start) -> None:
    sidecar = start_sidecar(KEYS)
    assert _load(sidecar).status_code == 200
    followers = [Follower(sidecar, "?tail=0") for _ in range(5)]
    wait_until(lambda: sidecar.status(ADMIN_KEY)["log_followers"] == 5, timeout_s=10)
    for follower in followers:
        follower.close()
    wait_until(lambda: sidecar.status(ADMIN_KEY)["log_followers"] == 0, timeout_s=5)  # no output needed to notice
    _say(sidecar, "nobody reads this")  # and output with no reader costs nothing more than the log line
    assert sidecar.status(ADMIN_KEY)["state"] == "ready"


def test_an_open_stream_does_not_hold_up_the_sidecars_stop(start_sidecar: Start) -> None:
    sidecar = start_sidecar(KEYS)  # drain timeout 30 s by default: a stream that held the drain would show
    assert _load(sidecar).status_code == 200
    follower = Follower(sidecar)
    try:
        wait_until(lambda: sidecar.status(ADMIN_KEY)["log_followers"] == 1, timeout_s=10)
        started = time.monotonic()
        sidecar.stop()
        assert time.monotonic() - started < 10
        assert follower.done.wait(5) and follower.events[-1][0] == "end"
    finally:
        follower.close()


@pytest.mark.parametrize("query", ["?tail=101", "?tail=-1", "?tail=x"])
def test_a_bad_tail_is_a_400(start_sidecar: Start, query: str) -> None:
    sidecar = start_sidecar(KEYS)
    assert _load(sidecar).status_code == 200
    answered = httpx.get(f"{sidecar.url}/v1/model/logs{query}", headers=ADMIN)
    assert answered.status_code == 400 and answered.json()["error"]["param"] == "tail"


def test_no_engine_is_a_404_a_data_key_a_403_an_external_engine_a_400(start_sidecar: Start) -> None:
    sidecar = start_sidecar(KEYS)
    answered = httpx.get(f"{sidecar.url}/v1/model/logs", headers=ADMIN)
    assert answered.status_code == 404 and answered.json()["error"]["code"] == "no_engine"
    assert httpx.get(f"{sidecar.url}/v1/model/logs", headers=DATA).status_code == 403
    served = _load(start_sidecar(KEYS)).json()  # a mock another sidecar runs: a server that runs elsewhere
    key = engine_key(served["pid"], "VLLM_API_KEY")
    external = {"engine": "external", "model": "m", "url": f"http://127.0.0.1:{served['port']}", "api_key": key}
    assert httpx.post(f"{sidecar.url}/v1/model/load", json=external, headers=ADMIN, timeout=30).status_code == 200
    answered = httpx.get(f"{sidecar.url}/v1/model/logs", headers=ADMIN)
    assert answered.status_code == 400 and "runs elsewhere" in answered.json()["error"]["message"]


def test_an_engine_flooding_its_output_is_logged_at_the_set_rate_and_every_line_kept_or_counted(
    start_sidecar: Start,
) -> None:
    """Past SIDECAR_ENGINE_OUTPUT_LINES_PER_S (bursts of ten seconds' worth) the engine's lines are not logged but
    counted in `engine_output_unlogged` warnings (the first at once, the last within 5 s); readers of the output
    get every one."""
    sidecar = start_sidecar(KEYS | {"SIDECAR_ENGINE_OUTPUT_LINES_PER_S": "10", "SIDECAR_LOG_FORMAT": "json"})
    assert _load(sidecar).status_code == 200
    follower = Follower(sidecar)  # from the kept tail: every line the engine has written

    def records(event: str) -> list[dict[str, Any]]:
        lines = (json.loads(line) for line in sidecar.output().splitlines() if line.startswith("{"))
        return [record for record in lines if record.get("event") == event]

    try:
        _say(sidecar, "flooded", repeat=500)
        wait_until(lambda: follower.lines().count("flooded") == 500, timeout_s=10)
        logged = [record["line"] for record in records("engine_output")]
        assert 50 <= logged.count("flooded") <= 110  # the burst left after start-up, then 10 a second

        def resumed() -> bool:
            _say(sidecar, "after the flood")
            return "after the flood" in [record["line"] for record in records("engine_output")]

        wait_until(resumed, timeout_s=10)

        def all_counted() -> bool:
            unlogged = sum(record["lines"] for record in records("engine_output_unlogged"))
            return len(follower.lines()) == len(records("engine_output")) + unlogged

        wait_until(all_counted, timeout_s=10)
        warnings = records("engine_output_unlogged")
        assert warnings[0]["lines_per_s"] == 10
        assert sum(record["lines"] for record in warnings) >= 500 - 110
        tail = sidecar.status(ADMIN_KEY)["output_tail"]
        assert "after the flood" in tail[-1] and "flooded" in tail[0]
    finally:
        follower.close()
