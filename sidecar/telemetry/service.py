"""Telemetry: the watchdog, NVML and the Prometheus series in one place, and the handlers of its two routes.

`GET /metrics` (Prometheus text) and `GET /v1/telemetry` (the latest sample and a recent window's min, mean
and max, JSON). Per request, `window()` and `gpu_memory()` give `usage.performance` its GPU fields: the
peak of used GPU memory over the request (direct reads at start and end, and the watchdog's samples between)
and end minus start.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from sidecar.errors import BadRequest
from sidecar.settings import Settings
from sidecar.telemetry.gpu import Gpus
from sidecar.telemetry.metrics import EngineFigures, Metrics
from sidecar.telemetry.watchdog import ResourceWatchdog

_SUMMARIZED = (
    "sidecar_cpu_pct",
    "sidecar_rss_mb",
    "engine_cpu_pct",
    "engine_rss_mb",
    "ram_used_mb",
    "gpu_used_mb",
    "engine_gpu_mb",
)


@dataclass(frozen=True, slots=True)
class GpuWindow:
    started: float  # monotonic
    used_mb: float | None  # at the start


class Telemetry:
    def __init__(
        self,
        settings: Settings,
        gpus: Gpus,
        engine_pid: Callable[[], int | None],
        engine_status: Callable[[], EngineFigures] | None,
        known_routes: Iterable[str] = (),
    ) -> None:
        self.gpus = gpus
        self.watchdog = ResourceWatchdog(settings.watchdog_interval_ms / 1000, gpus, engine_pid)
        self.metrics = Metrics(self.watchdog, engine_status, known_routes)
        # Where a request's GPU peak between its two reads comes from: this watchdog, or (in a data-plane
        # worker) the supervising process's, through the memory they share.
        self.gpu_peak_since: Callable[[float], float | None] = self.watchdog.gpu_peak_since

    def start(self) -> None:
        self.watchdog.start()

    def stop(self) -> None:
        self.watchdog.stop()
        self.gpus.close()

    def window(self) -> GpuWindow | None:
        """Open a request's GPU window (one NVML read); None without a GPU, at no cost."""
        if not self.gpus.available:
            return None
        return GpuWindow(time.monotonic(), self.gpus.used_mb())

    def gpu_memory(self, window: GpuWindow | None) -> tuple[float | None, float | None]:
        """(peak, delta) of used GPU memory since the window opened, in MB."""
        if window is None or window.used_mb is None:
            return None, None
        end = self.gpus.used_mb()
        if end is None:
            return None, None
        readings = [window.used_mb, end]
        sampled = self.gpu_peak_since(window.started)
        if sampled is not None:
            readings.append(sampled)
        return max(readings), round(end - window.used_mb, 1)

    def snapshot(self, window_s: float) -> dict[str, Any]:
        latest = self.watchdog.latest()
        samples = self.watchdog.since(time.monotonic() - window_s)
        summary: dict[str, Any] = {}
        for name in _SUMMARIZED:
            values = [v for s in samples if (v := getattr(s, name)) is not None]
            if values:
                summary[name] = {
                    "min": min(values),
                    "mean": round(sum(values) / len(values), 2),
                    "max": max(values),
                }
            else:
                summary[name] = None
        return {
            "latest": None if latest is None else latest.as_dict(),
            "window": {"seconds": window_s, "samples": len(samples), "summary": summary},
            "watchdog": {
                "interval_ms": self.watchdog.interval_s * 1000,
                "real_intervals_ms": self.watchdog.intervals_ms(),
            },
            "gpu_available": self.gpus.available,
        }


async def metrics(request: Request) -> Response:
    telemetry: Telemetry = request.app.state.telemetry
    load = await request.app.state.supervisor.engine_load()  # read now: never a stale figure
    return Response(telemetry.metrics.exposition(load), media_type=CONTENT_TYPE_LATEST)


async def telemetry_snapshot(request: Request) -> Response:
    telemetry: Telemetry = request.app.state.telemetry
    raw = request.query_params.get("window_s", "60")
    try:
        window_s = float(raw)
    except ValueError:
        window_s = -1.0
    if not 0 < window_s <= 3600:
        raise BadRequest("window_s must be a number of seconds between 0 and 3600", param="window_s")
    return JSONResponse(telemetry.snapshot(window_s))
