from __future__ import annotations

import hashlib
import io
import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from sidecar import logs as sidecar_logs
from sidecar.log_writer import BackgroundWriter, stream_lines
from sidecar.logs import LineBudget, configure_logging, get_logger, timer
from sidecar.redaction import Redactor
from sidecar.settings import load_settings
from tests.processes import SidecarProcess

LOG_FILES = ("sidecar.log", "errors.log", "sidecar.jsonl")


def read_logs(directory: Path) -> dict[str, str]:
    return {name: (directory / name).read_text() for name in LOG_FILES}


def test_secret_registered_at_run_time_is_in_no_sink(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    log_dir = tmp_path / "logs"
    redactor = Redactor()
    configure_logging(load_settings(None, log_dir=log_dir), redactor)
    log = get_logger("sidecar.test")

    redactor.register("registered-at-run-time")
    log.info("engine_output", line="HF_TOKEN=registered-at-run-time loaded")
    logging.getLogger("uvicorn.error").error("foreign record with registered-at-run-time and hf_abcdefghijkl")
    try:
        token = "registered-at-run-time"
        raise ValueError(f"failed with {token}")
    except ValueError:
        log.exception("load_failed", env={"HF_TOKEN": "registered-at-run-time"})

    sidecar_logs.flush_logs()  # written by the log thread: all of it before reading
    console = capfd.readouterr().err
    logs = read_logs(log_dir)
    for text in (console, *logs.values()):
        assert "registered-at-run-time" not in text
        assert "hf_abcdefghijkl" not in text
    assert "engine_output" in console and "engine_output" in logs["sidecar.log"]
    assert "foreign record" in logs["sidecar.jsonl"]
    assert "engine_output" not in logs["errors.log"]
    assert "load_failed" in logs["errors.log"] and "ValueError" in logs["errors.log"]
    assert all(json.loads(line) for line in logs["sidecar.jsonl"].splitlines())


def test_log_files_rotate_by_size(tmp_path: Path) -> None:
    configure_logging(load_settings(None, log_dir=tmp_path, log_file_max_bytes=2000, log_file_backups=2), Redactor())
    log = get_logger("sidecar.test")
    for i in range(100):
        log.info("filler", i=i, padding="x" * 50)
    sidecar_logs.flush_logs()  # written by the files' threads: all of it before reading
    assert (tmp_path / "sidecar.log.1").exists()
    assert not (tmp_path / "sidecar.log.3").exists()
    assert (tmp_path / "sidecar.log").stat().st_size <= 2000


class _StalledDisk:
    """A disk that takes no write until `free` is set (a network volume gone slow); after 5 s it stalls no more, so
    that a logging call that waits on it ends and says so."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.free = threading.Event()
        self.gave_up = False
        write_lines = sidecar_logs._RotatingFile.write_lines

        def stalled(file: sidecar_logs._RotatingFile, lines: list[str]) -> None:
            if not self.gave_up and not self.free.wait(5):
                self.gave_up = True
            write_lines(file, lines)

        monkeypatch.setattr(sidecar_logs._RotatingFile, "write_lines", stalled)


def test_a_log_file_on_a_stalled_disk_holds_up_no_logging_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The event loop logs: a file written by the caller would stop every request while its disk stalls."""
    disk = _StalledDisk(monkeypatch)
    configure_logging(load_settings(None, log_dir=tmp_path), Redactor())
    log = get_logger("sidecar.test")
    for number in range(100):
        log.info("logged_while_the_disk_stalls", number=number)
    disk.free.set()
    sidecar_logs.flush_logs()
    assert not disk.gave_up, "a logging call waited for the disk"
    lines = (tmp_path / "sidecar.jsonl").read_text().splitlines()
    assert [json.loads(line)["number"] for line in lines] == list(range(100))


def test_level_from_settings(capfd: pytest.CaptureFixture[str]) -> None:
    configure_logging(load_settings(None, log_level="warning"), Redactor())
    log = get_logger("sidecar.test")
    log.info("quiet_event")
    log.warning("loud_event")
    sidecar_logs.flush_logs()  # written by the log thread: all of it before reading
    err = capfd.readouterr().err
    assert "loud_event" in err and "quiet_event" not in err


def test_timer_logs_duration_and_outcome(capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    configure_logging(load_settings(None, log_format="json"), Redactor())
    ticks = iter([10.0, 10.25, 20.0, 20.0015])  # a fake clock: each block's start and end, in seconds
    monkeypatch.setattr(sidecar_logs, "clock", lambda: next(ticks))
    log = get_logger("sidecar.test")
    with timer(log, "model_load", engine="mock") as fields:
        fields["pid"] = 42
    with pytest.raises(RuntimeError), timer(log, "model_unload"):
        raise RuntimeError("boom")
    sidecar_logs.flush_logs()  # written by the log thread: all of it before reading
    records = [json.loads(line) for line in capfd.readouterr().err.splitlines()]
    load, unload = records
    assert (load["event"], load["outcome"], load["engine"], load["pid"]) == ("model_load", "ok", "mock", 42)
    assert (load["duration_ms"], unload["duration_ms"]) == (250.0, 1.5)
    assert (unload["event"], unload["outcome"], unload["level"]) == ("model_unload", "error", "warning")


def test_keys_never_reach_console_or_files(tmp_path: Path, start_sidecar: Callable[..., SidecarProcess]) -> None:
    log_dir = tmp_path / "logs"
    sidecar = start_sidecar(
        {
            "SIDECAR_API_KEYS": "data-key-secret-1",
            "SIDECAR_ADMIN_KEYS": "admin-key-secret-2",
            "SIDECAR_LOG_DIR": str(log_dir),
            "SIDECAR_LOG_LEVEL": "debug",
        }
    )
    with httpx.Client(base_url=sidecar.url) as client:
        client.get("/v1/models", headers={"Authorization": "Bearer data-key-secret-1", "X-Request-ID": "ok-key"})
        client.get("/v1/model", headers={"X-API-Key": "admin-key-secret-2"})
        client.get("/v1/models", headers={"Authorization": "Bearer sk-wrongkey0123456", "X-Request-ID": "bad-key"})
        client.post("/v1/chat/completions", headers={"X-API-Key": "data-key-secret-1"}, content=b"not json")
    sidecar.stop()

    texts = [sidecar.output(), *read_logs(log_dir).values()]
    for text in texts:
        for secret in ("data-key-secret-1", "admin-key-secret-2", "sk-wrongkey0123456"):
            assert secret not in text
    access = [json.loads(line) for line in (log_dir / "sidecar.jsonl").read_text().splitlines()]
    by_id = {r["request_id"]: r for r in access if r["event"] == "request"}
    assert by_id["ok-key"]["status"] == 503
    assert by_id["bad-key"]["status"] == 403
    # What the docs say an operator can work out from a key to find its lines: its SHA-256's first 12 hex digits.
    for request_id, key in (("ok-key", "data-key-secret-1"), ("bad-key", "sk-wrongkey0123456")):
        assert by_id[request_id]["key_fingerprint"] == hashlib.sha256(key.encode()).hexdigest()[:12]
    assert {"method", "path", "duration_ms"} <= by_id["ok-key"].keys()


def test_engine_lines_carry_no_request_id_of_the_load_that_started_the_engine(
    start_sidecar: Callable[..., SidecarProcess],
) -> None:
    sidecar = start_sidecar({"SIDECAR_LOG_FORMAT": "json"})
    load = {"engine": "mock", "model": "m", "args": {"print-env": ["HOME"]}}
    headers = {"X-Request-ID": "the-load-request"}
    assert httpx.post(f"{sidecar.url}/v1/model/load", json=load, headers=headers, timeout=30).status_code == 200
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    httpx.post(f"{sidecar.url}/v1/chat/completions", json=chat, headers={"X-Request-ID": "a-chat"}, timeout=30)
    records = [json.loads(line) for line in sidecar.output().splitlines() if line.startswith("{")]
    engine_lines = [r for r in records if r.get("event") in ("engine_output", "engine_spawn", "model_ready")]
    assert {r["event"] for r in engine_lines} == {"engine_output", "engine_spawn", "model_ready"}
    assert all("request_id" not in r for r in engine_lines), engine_lines
    access = [r for r in records if r.get("request_id") == "the-load-request"]
    assert access, "the load's own access line keeps its request id"


def test_a_log_reader_that_stops_reading_stops_no_request(tmp_path: Path) -> None:
    """Standard error a pipe that nobody reads (a log driver that blocks): the sidecar answers on well past the
    pipe's 64 KB of lines, where writing them from its event loop stopped it, /health included, after some 125
    requests. Read again, the pipe gets every line."""
    sidecar = SidecarProcess(tmp_path, {"SIDECAR_LOG_FORMAT": "json"}, unread=True)
    requests = 400  # some 300 KB of access lines
    try:
        sidecar.wait_healthy()
        assert sidecar.load().status_code == 200
        for number in range(requests):
            answer = sidecar.chat(None, headers={"X-Request-ID": f"r-{number}"}, timeout=10, ttft_ms=0, itl_ms=0)
            assert answer.status_code == 200, number
        assert httpx.get(f"{sidecar.url}/health", timeout=10).status_code == 200
    finally:
        output = sidecar.process.stdout
        assert output is not None
        lines: list[bytes] = []
        reader = threading.Thread(target=lambda: lines.extend(output))
        reader.start()
        sidecar.stop()
        reader.join(timeout=30)
    records = [json.loads(line) for line in lines if line.startswith(b"{")]
    answered = {r["request_id"] for r in records if r.get("event") == "request" and r["path"] == "/v1/chat/completions"}
    assert answered == {f"r-{number}" for number in range(requests)}
    assert "sidecar_stopped" in {r.get("event") for r in records}  # what it wrote as it exited, too


class _StuckStream(io.StringIO):
    """A stream whose reader has stopped until `reading` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.reading = threading.Event()

    def write(self, text: str) -> int:
        self.reading.wait()
        return super().write(text)


def test_what_queues_for_a_stuck_stream_is_bounded_and_what_was_dropped_is_said() -> None:
    stream = _StuckStream()
    writer = BackgroundWriter(stream_lines(stream), max_bytes=100)
    writer.write("first")  # taken by the thread, which then waits on the stream
    assert not writer.flush(timeout_s=0.2)  # a stuck reader: flush gives up at its timeout
    for number in range(30):
        writer.write(f"line {number:02}")  # 7 characters each: 14 fit in 100, the other 16 are dropped
    stream.reading.set()
    assert writer.flush(timeout_s=5)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "first"
    assert json.loads(lines[1]) == {"event": "log_lines_dropped", "dropped": 16, "level": "warning"}
    assert lines[2:] == [f"line {number:02}" for number in range(14)]


def test_configuring_again_ends_the_old_files_writers_with_their_lines_written(tmp_path: Path) -> None:
    def writers() -> int:
        return sum(thread.name == "log-writer" for thread in threading.enumerate())

    configure_logging(load_settings(None, log_dir=tmp_path / "first"), Redactor())
    before = writers()
    get_logger("sidecar.test").info("last_line_to_the_first_files")
    for name in ("second", "third"):
        configure_logging(load_settings(None, log_dir=tmp_path / name), Redactor())
    assert writers() == before
    assert "last_line_to_the_first_files" in (tmp_path / "first" / "sidecar.jsonl").read_text()


def test_a_line_budget_lets_a_burst_through_whole_then_the_rate() -> None:
    now = [100.0]
    budget = LineBudget(5, clock=lambda: now[0])
    assert sum(budget.take() for _ in range(80)) == 50  # ten seconds' worth at once
    now[0] += 1.0
    assert sum(budget.take() for _ in range(80)) == 5  # then five a second
    now[0] += 60.0
    assert budget.take(80) == 50  # a long quiet refills the burst, never past it
    now[0] += 0.5
    assert budget.take(1) == 1 and budget.take(10) == 1  # two and a half: whole lines only, the half kept
    now[0] += 0.2
    assert budget.take(10) == 1


def test_a_line_budget_of_zero_lets_every_line_through() -> None:
    budget = LineBudget(0, clock=lambda: 0.0)
    assert budget.take(100_000) == 100_000 and budget.take() == 1
