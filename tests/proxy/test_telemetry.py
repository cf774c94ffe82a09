"""/metrics and /v1/telemetry of a real sidecar after real requests through it."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil

from tests.processes import wait_until
from tests.proxy.conftest import AUTH, MESSAGES, MODEL, Stack, post_stream, sample_value, samples

CHAT = "/v1/chat/completions"


def test_metrics_count_what_was_sent(stack: Stack) -> None:
    before = samples(stack)
    for i in range(3):
        post_stream(stack.url + CHAT, {"model": MODEL, "messages": MESSAGES, "stream": True}, f"metrics-s-{i}")
    for _ in range(2):
        assert httpx.post(stack.url + CHAT, json={"model": MODEL, "messages": MESSAGES}, headers=AUTH).is_success
    assert httpx.post(stack.url + CHAT, content=b"not json", headers=AUTH).status_code == 400
    after = samples(stack)

    ok = {"route": CHAT, "status": "2xx", "model": MODEL, "engine": "mock"}
    assert (
        sample_value(after, "sidecar_requests_total", **ok) - sample_value(before, "sidecar_requests_total", **ok) == 5
    )
    bad = {"route": CHAT, "status": "4xx", "model": "", "engine": ""}
    assert (
        sample_value(after, "sidecar_requests_total", **bad) - sample_value(before, "sidecar_requests_total", **bad)
        == 1
    )
    served = {"model": MODEL, "engine": "mock"}
    for histogram in ("sidecar_ttft_seconds", "sidecar_tpot_seconds", "sidecar_request_latency_seconds"):
        count = f"{histogram}_count"
        assert sample_value(after, count, **served) - sample_value(before, count, **served) == 5, histogram
    itl = sample_value(after, "sidecar_itl_seconds_count", **served) - sample_value(
        before, "sidecar_itl_seconds_count", **served
    )
    assert itl == 5 * 15  # 16 tokens: 15 gaps each
    tokens = {"model": MODEL, "engine": "mock", "kind": "completion"}
    assert (
        sample_value(after, "sidecar_tokens_total", **tokens) - sample_value(before, "sidecar_tokens_total", **tokens)
        == 80
    )
    assert sample_value(after, "sidecar_engine_state", state="ready") == 1
    assert sample_value(after, "sidecar_engine_state", state="idle") == 0
    assert sample_value(after, "sidecar_process_resident_memory_bytes", process="engine") > 10 * 2**20
    assert sample_value(after, "sidecar_process_resident_memory_bytes", process="sidecar") > 10 * 2**20
    assert sample_value(after, "sidecar_system_memory_bytes", kind="total") > 0
    assert not any(name.startswith("sidecar_gpu_") for name, _ in after)  # no GPU here: no GPU series


def test_telemetry_shows_the_sidecar_and_the_engine(stack: Stack) -> None:
    def snapshot() -> dict[str, object]:
        response = httpx.get(f"{stack.url}/v1/telemetry", params={"window_s": 30}, headers=AUTH)
        assert response.status_code == 200
        body: dict[str, object] = response.json()
        return body

    wait_until(lambda: (snapshot()["window"]["samples"] or 0) >= 3, timeout_s=5)  # type: ignore[index]
    body = snapshot()
    latest = body["latest"]
    assert isinstance(latest, dict)
    assert latest["engine_rss_mb"] > 10 and latest["sidecar_rss_mb"] > 10 and latest["engine_processes"] >= 1
    assert latest["gpus"] is None and latest["gpu_used_mb"] is None and body["gpu_available"] is False
    summary = body["window"]["summary"]  # type: ignore[index]
    assert summary["engine_rss_mb"]["min"] <= summary["engine_rss_mb"]["mean"] <= summary["engine_rss_mb"]["max"]
    assert summary["gpu_used_mb"] is None
    assert body["watchdog"]["real_intervals_ms"]["p50"] > 0  # type: ignore[index]
    assert httpx.get(f"{stack.url}/v1/telemetry").status_code == 401
    assert httpx.get(f"{stack.url}/v1/telemetry", params={"window_s": "x"}, headers=AUTH).status_code == 400


def test_performance_carries_null_gpu_fields_without_a_gpu(stack: Stack) -> None:
    answer = httpx.post(stack.url + CHAT, json={"model": MODEL, "messages": MESSAGES}, headers=AUTH).json()
    performance = answer["usage"]["performance"]
    assert "gpu_memory_peak_mb" in performance and performance["gpu_memory_peak_mb"] is None
    assert performance["gpu_memory_delta_mb"] is None


LOAD = ("sidecar_engine_queued_requests", "sidecar_engine_running_requests", "sidecar_engine_kv_cache_usage_ratio")


def _load(stack: Stack) -> dict[str, float]:
    scraped = samples(stack)
    labels = (("engine", "mock"), ("model", MODEL))
    return {name: scraped[(name, labels)] for name in LOAD if (name, labels) in scraped}


def test_the_engines_own_load_is_exported_under_one_name_and_absent_when_unread(
    own_stack: Callable[..., Stack],
) -> None:
    # The mock engine schedules as vLLM does with --max-num-seqs 1: one request runs, the others wait.
    stack = own_stack(engine_args={"max-num-seqs": 1, "tokens": 400, "itl-ms": 10})
    assert _load(stack) == dict(zip(LOAD, (0.0, 0.0, 0.0), strict=True))
    body = {"model": MODEL, "messages": MESSAGES, "stream": True}
    with ThreadPoolExecutor(3) as pool:
        streams = [pool.submit(post_stream, stack.url + CHAT, body, f"load-{i}") for i in range(3)]
        wait_until(lambda: _load(stack).get(LOAD[0]) == 2.0, timeout_s=10)
        assert _load(stack) == dict(zip(LOAD, (2.0, 1.0, 1.0), strict=True))  # vLLM's figures, under our names

        # A hung engine: its figures are left out, not the last ones repeated, and the scrape still answers.
        engine = psutil.Process(httpx.get(f"{stack.url}/v1/model", headers=AUTH).json()["pid"])
        engine.suspend()
        try:
            started = time.monotonic()
            assert _load(stack) == {}
            assert time.monotonic() - started < 5
        finally:
            engine.resume()
        for stream in streams:
            stream.result(timeout=60)
    assert _load(stack) == dict(zip(LOAD, (0.0, 0.0, 0.0), strict=True))
