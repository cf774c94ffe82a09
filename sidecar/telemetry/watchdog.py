"""ResourceWatchdog: a thread that samples CPU, memory and GPUs every interval into a bounded ring.

A thread, never the event loop: psutil reads /proc and NVML calls the driver, both blocking. Each sample
covers the sidecar, the engine's whole process tree (workers included), system RAM and every visible GPU.
The watchdog times itself: the real intervals between samples, whose p50 and p99 say how late it runs.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import psutil

from sidecar.logs import Throttle, get_logger
from sidecar.telemetry.gpu import GpuReading, Gpus, processes_memory_mb
from sidecar.telemetry.stats import percentile

log = get_logger("sidecar.watchdog")

MB = 1024 * 1024
WINDOW_S = 300  # how much the ring holds, whatever the interval
TREE_REFRESH_S = 1.0  # how often the engine's process tree is listed again (new workers, exited ones)


@dataclass(frozen=True, slots=True)
class Sample:
    monotonic: float
    time: float
    sidecar_cpu_pct: float
    sidecar_rss_mb: float
    engine_cpu_pct: float | None
    engine_rss_mb: float | None
    engine_processes: int
    ram_used_mb: float
    ram_total_mb: float
    gpus: list[GpuReading] | None
    engine_gpu_mb: float | None  # the engine's processes' own GPU memory, where the driver reports it

    @property
    def gpu_used_mb(self) -> float | None:
        return None if self.gpus is None else round(sum(g.used_mb for g in self.gpus), 1)

    def as_dict(self) -> dict[str, Any]:
        sample = asdict(self)
        sample["gpu_used_mb"] = self.gpu_used_mb
        sample["gpus"] = None if self.gpus is None else [asdict(g) for g in self.gpus]
        return sample


class ResourceWatchdog:
    def __init__(self, interval_s: float, gpus: Gpus, engine_pid: Callable[[], int | None]) -> None:
        self.interval_s = interval_s
        self.gpus = gpus
        self._engine_pid = engine_pid
        size = max(10, int(WINDOW_S / interval_s))
        self._samples: deque[Sample] = deque(maxlen=size)
        self._intervals: deque[float] = deque(maxlen=size)
        # Every interval since the start, for the summary's count and sum (the window above is for quantiles).
        self.intervals_total = 0
        self.intervals_sum_s = 0.0
        self._processes: dict[int, psutil.Process] = {}  # kept: cpu_percent() measures since the last call
        self._listed_at = 0.0
        self._me = psutil.Process(os.getpid())
        self._me.cpu_percent(None)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.on_sample: Callable[[Sample], None] | None = None  # told of each sample, in the watchdog's thread

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="resource-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        last = None
        failures = Throttle(60.0)  # out of descriptors, say, every sample fails: not a traceback ten times a second
        next_at = time.monotonic()
        while not self._stop.is_set():
            try:
                sample = self.sample()
            except Exception as exc:  # a reading that fails must not stop the sampling
                failed = failures.due()
                if failed and isinstance(exc, OSError) and exc.errno == errno.EMFILE:  # a known state: no traceback
                    log.warning("watchdog_sample_failed", failed_samples=failed, reason="out of file descriptors")
                elif failed:
                    log.exception("watchdog_sample_failed", failed_samples=failed)
            else:
                self._samples.append(sample)
                if self.on_sample is not None:
                    self.on_sample(sample)
                if last is not None:
                    self._intervals.append(sample.monotonic - last)
                    self.intervals_total += 1
                    self.intervals_sum_s += sample.monotonic - last
                last = sample.monotonic
            # On a fixed schedule: a slow sample shortens the next wait instead of shifting every later one.
            next_at = max(next_at + self.interval_s, time.monotonic())
            self._stop.wait(next_at - time.monotonic())

    def sample(self) -> Sample:
        now = time.monotonic()
        engine_cpu, engine_rss, engine_pids = self._engine_tree()
        memory = psutil.virtual_memory()
        gpus = self.gpus.read()
        return Sample(
            monotonic=now,
            time=time.time(),
            sidecar_cpu_pct=self._me.cpu_percent(None),
            sidecar_rss_mb=round(self._me.memory_info().rss / MB, 1),
            engine_cpu_pct=engine_cpu,
            engine_rss_mb=engine_rss,
            engine_processes=len(engine_pids),
            ram_used_mb=round((memory.total - memory.available) / MB, 1),
            ram_total_mb=round(memory.total / MB, 1),
            gpus=gpus,
            engine_gpu_mb=processes_memory_mb(gpus, engine_pids),
        )

    def _engine_tree(self) -> tuple[float | None, float | None, set[int]]:
        pid = self._engine_pid()
        if pid is None:
            self._processes.clear()
            return None, None, set()
        now = time.monotonic()
        if pid not in self._processes or now - self._listed_at >= TREE_REFRESH_S:
            # Listing the tree scans all of /proc (about 2 ms): once a second, not on every sample.
            try:
                root = self._processes.get(pid) or psutil.Process(pid)
                tree = [root, *root.children(recursive=True)]
            except psutil.Error:
                return None, None, set()
            self._processes = {p.pid: self._processes.get(p.pid, p) for p in tree}
            self._listed_at = now
        cpu = rss = 0.0
        for known_pid, process in list(self._processes.items()):
            try:
                cpu += process.cpu_percent(None)  # 0.0 the first time a process is seen
                rss += process.memory_info().rss
            except psutil.Error:
                del self._processes[known_pid]  # gone since the listing
        if not self._processes:
            return None, None, set()
        return round(cpu, 1), round(rss / MB, 1), set(self._processes)

    # -- reading ------------------------------------------------------------------------------------------

    def latest(self) -> Sample | None:
        return self._samples[-1] if self._samples else None

    def since(self, monotonic: float) -> list[Sample]:
        return [s for s in list(self._samples) if s.monotonic >= monotonic]

    def gpu_peak_since(self, monotonic: float) -> float | None:
        used = [s.gpu_used_mb for s in self.since(monotonic) if s.gpu_used_mb is not None]
        return max(used) if used else None

    def intervals_ms(self) -> dict[str, float | int | None]:
        """The real intervals between samples: how far the watchdog drifts from its schedule."""
        values = sorted(self._intervals)
        if not values:
            return {"p50": None, "p99": None, "max": None, "count": 0}
        return {
            "p50": round(percentile(values, 50) * 1000, 3),
            "p99": round(percentile(values, 99) * 1000, 3),
            "max": round(values[-1] * 1000, 3),
            "count": len(values),
        }
