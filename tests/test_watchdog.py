"""The watchdog against real processes: the mock engine and its child show up in the samples."""

from __future__ import annotations

import errno
import subprocess
import sys
import types
from collections.abc import Iterator

import pytest
import structlog

from sidecar.telemetry.gpu import Gpus
from sidecar.telemetry.watchdog import ResourceWatchdog
from tests.processes import free_port, wait_until


@pytest.fixture
def engine() -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(
        [sys.executable, "-m", "engines.mock_server", "--port", str(free_port()), "--spawn-child"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    yield process
    subprocess.run(["pkill", "-KILL", "-s", str(process.pid)], check=False)
    process.wait()


def test_samples_cover_the_engines_process_tree_and_time_themselves(engine: subprocess.Popen[bytes]) -> None:
    no_gpu = Gpus(types.ModuleType("no-nvml"), environ={})
    watchdog = ResourceWatchdog(0.05, no_gpu, lambda: engine.pid)
    watchdog.start()
    try:
        # The mock engine (a Python server, tens of MB) and the child it spawned.
        wait_until(lambda: (s := watchdog.latest()) is not None and s.engine_processes == 2, timeout_s=10)
        wait_until(lambda: (watchdog.latest().engine_rss_mb or 0) > 10, timeout_s=10)  # type: ignore[union-attr]
        wait_until(lambda: watchdog.intervals_ms()["count"] >= 5, timeout_s=10)
    finally:
        watchdog.stop()
    sample = watchdog.latest()
    assert sample is not None
    assert sample.sidecar_rss_mb > 10 and 0 < sample.ram_used_mb < sample.ram_total_mb
    assert sample.engine_cpu_pct is not None and sample.engine_cpu_pct >= 0
    assert sample.gpus is None and sample.engine_gpu_mb is None
    intervals = watchdog.intervals_ms()
    assert intervals["p50"] is not None and intervals["p99"] is not None
    assert intervals["p50"] > 0  # reported as measured; how close to 50 ms depends on the machine's load
    assert len(watchdog.since(0)) == len(watchdog._samples) <= watchdog._samples.maxlen  # type: ignore[operator]


def test_no_engine_means_null_engine_fields() -> None:
    watchdog = ResourceWatchdog(0.1, Gpus(types.ModuleType("no-nvml"), environ={}), lambda: None)
    sample = watchdog.sample()
    assert (sample.engine_cpu_pct, sample.engine_rss_mb, sample.engine_processes) == (None, None, 0)
    gone = ResourceWatchdog(0.1, Gpus(types.ModuleType("no-nvml"), environ={}), lambda: 2**22 + 12345)
    assert gone.sample().engine_rss_mb is None


@pytest.mark.parametrize(
    ("failure", "level", "traceback"),
    [
        (OSError(errno.EMFILE, "Too many open files"), "warning", False),  # a known state, said as one
        (RuntimeError("a reading's bug"), "error", True),
    ],
)
def test_a_reading_that_keeps_failing_is_logged_once_a_minute_and_sampling_goes_on(
    failure: Exception, level: str, traceback: bool
) -> None:
    """Out of descriptors, every sample fails: one line, not ten a second (a warning: no traceback for a state the
    sidecar knows; one for anything else); samples resume as soon as the readings work again."""
    calls = 0

    def engine_pid() -> int | None:
        nonlocal calls
        calls += 1
        if calls <= 5:
            raise failure
        return None

    watchdog = ResourceWatchdog(0.01, Gpus(types.ModuleType("no-nvml"), environ={}), engine_pid)
    with structlog.testing.capture_logs() as logs:
        watchdog.start()
        wait_until(lambda: calls > 8, timeout_s=10)
        watchdog.stop()
    failures = [log for log in logs if log["event"] == "watchdog_sample_failed"]
    assert [log["failed_samples"] for log in failures] == [1], failures
    assert failures[0]["log_level"] == level and bool(failures[0].get("exc_info")) is traceback
    assert len(watchdog.since(0.0)) >= 3
