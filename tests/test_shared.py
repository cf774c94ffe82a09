"""The memory the supervising process and its data-plane workers share: two mappings of one file, as they have."""

from __future__ import annotations

import time
from pathlib import Path

from sidecar.control.shared import GPU_READINGS, SharedState
from sidecar.engine_state import EngineState


def test_a_worker_reads_what_the_supervisor_publishes_and_the_supervisor_adds_up_the_workers(tmp_path: Path) -> None:
    supervisor = SharedState.create(tmp_path / "run" / "sidecar.state", workers=2)
    worker = SharedState.attach(tmp_path / "run" / "sidecar.state", workers=2)
    assert worker.engine() == (EngineState.IDLE, 0, False)
    supervisor.publish(EngineState.READY, 3, idle_unloaded=False)
    assert worker.engine() == (EngineState.READY, 3, False)
    supervisor.publish(EngineState.IDLE, 3, idle_unloaded=True)
    assert worker.engine() == (EngineState.IDLE, 3, True)

    before = time.monotonic()
    worker.begin(0)
    worker.begin(0)
    worker.begin(1)
    assert supervisor.in_flight() == 3 and supervisor.last_used() >= before
    supervisor.reset(1, pid=4242)  # a new worker 1 (its count starts again)
    worker.begin(1)
    assert supervisor.workers_now() == [
        {"index": 0, "pid": 0, "in_flight": 2},
        {"index": 1, "pid": 4242, "in_flight": 1},
    ]
    worker.end(0)
    assert supervisor.in_flight() == 2
    supervisor.reset(0)  # worker 0 died with a request counted: a drain must not wait for it
    assert supervisor.in_flight() == 1


def test_a_workers_request_gets_its_gpu_peak_from_the_supervisors_watchdog(tmp_path: Path) -> None:
    supervisor = SharedState.create(tmp_path / "sidecar.state", workers=1)
    worker = SharedState.attach(tmp_path / "sidecar.state", workers=1)
    assert worker.gpu_peak_since(0.0) is None
    for at, used in ((10.0, 1000.0), (10.1, 5000.0), (10.2, 2000.0), (10.3, 1500.0)):
        supervisor.record_gpu(at, used)
    assert worker.gpu_peak_since(10.15) == 2000.0  # readings at or after the request's start only
    assert worker.gpu_peak_since(10.0) == 5000.0
    assert worker.gpu_peak_since(11.0) is None
    for number in range(GPU_READINGS + 10):  # the ring wraps: the newest readings are kept
        supervisor.record_gpu(20.0 + number, float(number))
    assert worker.gpu_peak_since(0.0) == float(GPU_READINGS + 9)
