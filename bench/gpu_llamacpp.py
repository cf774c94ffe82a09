"""`python -m bench.gpu_llamacpp`: llama.cpp's GPU memory as the sidecar reports it, against what the engine says.

llama-server reserves its weights, its whole KV cache and its compute buffers when it loads, and logs each
buffer's size. The check loads it through the sidecar, reads those lines from the engine's output in the
sidecar's JSON log, then streams `--streams` concurrent requests (each filling `--prompt-chars` +
`--tokens` cells of the KV cache) and compares:

- the engine's GPU memory at load with the sum of its buffers (the rest is the CUDA context, under 1 GiB);
- each request's `gpu_memory_peak_mb` with the memory used before it, after a first round of the same requests
  (the engine's first batches allocate once: CUDA graphs, cuBLAS's workspace; reported as `warm_up_peak`): the
  KV cache the requests fill was reserved at load, so the peak stays within `--tolerance-mb` of the baseline,
  and `gpu_memory_delta_mb` near 0;
- the memory freed at unload with the engine's memory at load (within 5 %), and the GPU's used memory after
  unload with what it was before the load (within `--tolerance-mb`).

Results go to stdout and `--out` as JSON; exit code 1 if a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench.gpu_check import report
from bench.processes import spawn_sidecar, wait_ok

_BUFFER = re.compile(r"\b(CUDA\d+)\s+(\w+) buffer size =\s+([\d.]+) MiB")
# Cells per stream, and streams (one per slot unless the cache is unified).
_KV_SIZE = re.compile(r"llama_kv_cache: size =\s*[\d.]+ MiB \(\s*(\d+) cells,\s*\d+ layers,\s*\d+/(\d+) seqs\)")


def engine_buffers(log: Path) -> dict[str, Any]:
    """The GPU buffers llama.cpp logged at load (MiB by kind), and its KV cache's cells per stream and streams."""
    buffers: dict[str, float] = {}
    kv_cells = kv_streams = None
    for raw in log.read_text().splitlines():
        try:
            record = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if record.get("event") != "engine_output":
            continue
        line = record.get("line", "")
        if match := _BUFFER.search(line):
            buffers[match[2]] = buffers.get(match[2], 0.0) + float(match[3])
        if match := _KV_SIZE.search(line):
            kv_cells, kv_streams = int(match[1]), int(match[2])
    return {"buffers_mib": buffers, "kv_cells": kv_cells, "kv_streams": kv_streams}


async def _stream(client: httpx.AsyncClient, prompt: str, tokens: int) -> dict[str, Any]:
    body = {
        "model": "bench-model",
        "messages": [{"role": "user", "content": prompt}],
        "stream": True,
        "max_tokens": tokens,
        "stream_options": {"include_usage": True},
    }
    performance: dict[str, Any] = {}
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {") and '"performance"' in line:
                performance = json.loads(line.removeprefix("data: "))["usage"]["performance"]
    return performance


async def _requests(url: str, streams: int, prompt_chars: int, tokens: int) -> list[dict[str, Any]]:
    limits = httpx.Limits(max_connections=streams)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        prompts = [("abcdefghij" * (prompt_chars // 10 + 1))[i % 10 : i % 10 + prompt_chars] for i in range(streams)]
        return await asyncio.gather(*(_stream(client, prompt, tokens) for prompt in prompts))


def _used_mb(client: httpx.Client) -> float | None:
    time.sleep(0.5)  # a few watchdog samples with the memory settled
    latest = client.get("/v1/telemetry", params={"window_s": 1}).json()["latest"]
    return None if latest is None else latest["gpu_used_mb"]


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    settings = {"SIDECAR_LOG_FORMAT": "json", "SIDECAR_ENGINE_EXECUTABLES": json.dumps({"llamacpp": args.server})}
    sidecar, url = spawn_sidecar(settings, workdir)
    try:
        wait_ok(url + "/health")
        with httpx.Client(base_url=url, timeout=args.startup_timeout) as client:
            before_load = _used_mb(client)
            load = {
                "engine": "llamacpp",
                "model": str(args.model),
                "served_model_name": "bench-model",
                "args": json.loads(args.engine_args),
            }
            loaded = client.post("/v1/model/load", json=load).json()
            if loaded.get("state") != "ready":
                raise RuntimeError(f"load failed: {loaded}")
            # A first round warms the engine up: its first batches allocate once (CUDA graphs, cuBLAS workspace).
            after_load = _used_mb(client)
            warm_up = asyncio.run(_requests(url, args.streams, args.prompt_chars, args.tokens))
            baseline = _used_mb(client)
            performances = asyncio.run(_requests(url, args.streams, args.prompt_chars, args.tokens))
            unloaded = client.post("/v1/model/unload").json()
            after_unload = _used_mb(client)
            telemetry = client.get("/v1/telemetry", params={"window_s": 5}).json()
    finally:
        sidecar.terminate()
        sidecar.wait(timeout=60)
    return _report(
        args,
        engine_buffers(workdir / "sidecar.log"),
        loaded,
        unloaded,
        performances,
        telemetry,
        {
            "before_load": before_load,
            "after_load": after_load,
            "warm_up_peak": max(
                (p["gpu_memory_peak_mb"] for p in warm_up if p.get("gpu_memory_peak_mb")), default=None
            ),
            "baseline": baseline,
            "after_unload": after_unload,
        },
    )


def _report(
    args: argparse.Namespace,
    engine: dict[str, Any],
    loaded: dict[str, Any],
    unloaded: dict[str, Any],
    performances: list[dict[str, Any]],
    telemetry: dict[str, Any],
    used: dict[str, float | None],
) -> dict[str, Any]:
    buffers_mb = sum(engine["buffers_mib"].values()) * 1.048576  # MiB to MB, as NVML's figures are reported
    at_load = loaded.get("gpu_memory_used_mb")
    baseline = used["baseline"]
    peaks = [p.get("gpu_memory_peak_mb") for p in performances]
    rises = [None if peak is None or baseline is None else round(peak - baseline, 1) for peak in peaks]
    deltas = [p.get("gpu_memory_delta_mb") for p in performances]
    freed = unloaded.get("freed_gpu_memory_mb")
    kv_mb = engine["buffers_mib"].get("KV", 0.0) * 1.048576
    cells_filled = [(p.get("prompt_tokens") or 0) + (p.get("completion_tokens") or 0) for p in performances]
    cells, streams = engine["kv_cells"], engine["kv_streams"]
    tolerance = args.tolerance_mb

    def near(value: float | None, expected: float | None, margin: float) -> bool:
        return value is not None and expected is not None and abs(value - expected) <= margin

    checks = {
        "engine_at_load_holds_its_buffers_plus_a_cuda_context": at_load is not None
        and buffers_mb <= at_load <= buffers_mb + 1024,
        "every_request_peak_within_tolerance_of_baseline": all(near(r, 0.0, tolerance) for r in rises),
        "every_request_delta_within_tolerance": all(near(d, 0.0, tolerance) for d in deltas),
        "requests_fit_in_the_reserved_kv_cache": cells is not None
        and streams is not None
        and max(cells_filled, default=0) <= cells
        and sum(cells_filled) <= cells * streams,
        "freed_at_unload_within_5pct_of_engine_at_load": at_load is not None and near(freed, at_load, 0.05 * at_load),
        "gpu_back_to_before_load_after_unload": near(used["after_unload"], used["before_load"], tolerance),
    }
    ttfts = sorted(p["ttft_ms"] for p in performances if p.get("ttft_ms") is not None)
    return {
        "engine_args": json.loads(args.engine_args),
        "engine_buffers_mib": engine["buffers_mib"],
        "engine_buffers_mb": round(buffers_mb, 1),
        "kv_cache": {
            "reserved_mb": round(kv_mb, 1),
            "cells_per_stream": cells,
            "streams": streams,
            "cells_filled_by_the_requests": sum(cells_filled),
            "cells_filled_by_one_request_max": max(cells_filled, default=None),
            # What the requests wrote into the cache: already reserved, so the GPU's used memory does not move.
            "filled_mb": round(kv_mb * sum(cells_filled) / (cells * streams), 1) if cells and streams else None,
        },
        "load": {
            "gpu_memory_used_mb": at_load,
            "cuda_context_and_overhead_mb": None if at_load is None else round(at_load - buffers_mb, 1),
            "load_time_s": loaded.get("load_time_s"),
        },
        "requests": {
            "streams": len(performances),
            "tokens_each": args.tokens,
            "baseline_gpu_used_mb": baseline,
            "peak_over_baseline_mb": _range(rises),
            "delta_mb": _range(deltas),
            "ttft_ms": {"min": ttfts[0] if ttfts else None, "max": ttfts[-1] if ttfts else None},
        },
        "unload": {"freed_gpu_memory_mb": freed, "exit_code": unloaded.get("exit_code")},
        "gpu_used_mb": used,
        "watchdog": telemetry["watchdog"],
        "gpu": (telemetry["latest"] or {}).get("gpus"),
        "checks": checks,
        "passed": all(checks.values()),
    }


def _range(values: list[float | None]) -> dict[str, float | None]:
    known = [value for value in values if value is not None]
    return {"min": min(known, default=None), "max": max(known, default=None), "unknown": len(values) - len(known)}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_llamacpp", description=__doc__.splitlines()[0])
    parser.add_argument("--server", required=True, help="llama-server built for the GPU")
    parser.add_argument("--model", type=Path, required=True, help="the .gguf model")
    parser.add_argument(
        "--engine-args",
        default='{"n-gpu-layers": 999, "parallel": 64, "ctx-size": 65536, "log-verbosity": 4}',
        help="llama-server's flags as a JSON object (default: all layers on the GPU, 64 slots, 65536 cells, and "
        "the log verbosity at which it logs its buffers)",
    )
    parser.add_argument("--streams", type=int, default=64, help="concurrent requests (default 64)")
    parser.add_argument("--prompt-chars", type=int, default=200, help="prompt length (one token a character)")
    parser.add_argument("--tokens", type=int, default=256, help="tokens each request generates (default 256)")
    parser.add_argument("--tolerance-mb", type=float, default=64.0, help="margin for 'no change' (default 64)")
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu_llamacpp.json"))
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    return report(run(args, args.out.parent), args.out)


if __name__ == "__main__":
    sys.exit(main())
