"""`python -m bench.gpu_check`: the sidecar's GPU readings against known allocations, on a machine with a GPU.

The mock engine holds GPU memory through PyTorch: `--gpu-mb` from start-up to exit (as an engine holds its
weights), and a request's `mock.gpu_mb` from its first token to its last. The check loads it (with vLLM's sleep
mode), streams one such request, puts it to sleep and wakes it (the mock gives its weights' memory back and
takes it again, as vLLM does), unloads it, and compares what the sidecar reports with what was allocated: the
request's peak over the baseline against its allocation, its delta against zero, the memory freed by sleep and
taken by wake against the weights', the memory freed at unload against the engine's memory at load. Each
within 5 %. Results go to stdout and `--out` as JSON; exit code 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench.processes import spawn_sidecar, wait_ok

TOLERANCE = 0.05


def _within(value: float | None, expected: float, tolerance_mb: float) -> bool:
    return value is not None and abs(value - expected) <= tolerance_mb


def _stream(client: httpx.Client, request_mb: float) -> dict[str, Any]:
    body = {
        "model": "gpu-mock",
        "messages": [{"role": "user", "content": "hold some memory"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "mock": {"gpu_mb": request_mb, "ttft_ms": 300, "itl_ms": 25},
    }
    performance: dict[str, Any] = {}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {") and '"usage"' in line:
                performance = json.loads(line.removeprefix("data: "))["usage"]["performance"]
    return performance


def run(engine_mb: float, request_mb: float, workdir: Path, workers: str = "1") -> dict[str, Any]:
    sidecar, url = spawn_sidecar({"SIDECAR_WORKERS": workers}, workdir)
    try:
        wait_ok(url + "/health")
        with httpx.Client(base_url=url, timeout=120) as client:
            load = {"engine": "mock", "model": "gpu-mock", "args": {"gpu-mb": engine_mb, "enable-sleep-mode": True}}
            loaded = client.post("/v1/model/load", json=load).json()
            time.sleep(0.5)  # a few watchdog samples with the engine's memory settled
            baseline = client.get("/v1/telemetry", params={"window_s": 1}).json()["latest"]["gpu_used_mb"]
            performance = _stream(client, request_mb)
            telemetry = client.get("/v1/telemetry", params={"window_s": 5}).json()
            slept = client.post("/v1/model/sleep").json()
            woken = client.post("/v1/model/wake").json()
            unloaded = client.post("/v1/model/unload").json()
    finally:
        sidecar.terminate()
        sidecar.wait(timeout=60)
    engine_at_load = loaded.get("gpu_memory_used_mb")
    peak = performance.get("gpu_memory_peak_mb")
    rise = None if peak is None or baseline is None else round(peak - baseline, 1)
    freed = unloaded.get("freed_gpu_memory_mb")
    checks = {
        "engine_holds_at_least_its_allocation": engine_at_load is not None and engine_at_load >= engine_mb,
        "request_peak_over_baseline_within_5pct": _within(rise, request_mb, TOLERANCE * request_mb),
        "request_delta_near_zero_within_5pct_of_allocation": _within(
            performance.get("gpu_memory_delta_mb"), 0.0, TOLERANCE * request_mb
        ),
        "sleep_freed_the_weights_within_5pct": _within(
            slept.get("freed_gpu_memory_mb"), engine_mb, TOLERANCE * engine_mb
        ),
        "wake_took_them_back_within_5pct": _within(woken.get("gpu_memory_taken_mb"), engine_mb, TOLERANCE * engine_mb),
        "freed_at_unload_within_5pct_of_engine_memory": engine_at_load is not None
        and _within(freed, engine_at_load, TOLERANCE * engine_at_load),
    }
    return {
        "workers": workers,
        "allocated": {"engine_mb": engine_mb, "request_mb": request_mb},
        "load": {
            "gpu_memory_used_mb": engine_at_load,
            "cuda_context_and_overhead_mb": None if engine_at_load is None else round(engine_at_load - engine_mb, 1),
        },
        "request": {
            "baseline_gpu_used_mb": baseline,
            "gpu_memory_peak_mb": peak,
            "peak_over_baseline_mb": rise,
            "gpu_memory_delta_mb": performance.get("gpu_memory_delta_mb"),
            "ttft_ms": performance.get("ttft_ms"),
        },
        "sleep": slept,
        "wake": woken,
        "unload": {"freed_gpu_memory_mb": freed, "exit_code": unloaded.get("exit_code")},
        "watchdog": telemetry["watchdog"],
        "gpu": (telemetry["latest"] or {}).get("gpus"),
        "checks": checks,
        "passed": all(checks.values()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--engine-mb", type=float, default=4096, help="GPU memory the engine holds (default 4096)")
    parser.add_argument("--request-mb", type=float, default=2048, help="GPU memory a request holds (default 2048)")
    parser.add_argument(
        "--workers",
        default="1",
        help="SIDECAR_WORKERS (a count, or auto): the request is served by a worker, read by the supervisor's one "
        "watchdog (default 1)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu_check.json"))
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    return report(run(args.engine_mb, args.request_mb, args.out.parent, args.workers), args.out)


def report(result: dict[str, Any], out: Path) -> int:
    """A check's result as JSON to stdout and `out`; the exit code says whether it passed."""
    text = json.dumps(result, indent=2)
    out.write_text(text + "\n")
    sys.stdout.write(text + "\n")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
