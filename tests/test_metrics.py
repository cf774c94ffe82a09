from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from engines.external import ANY_ENGINE_LOAD
from engines.llamacpp import LLAMA_SERVER_LOAD
from engines.sglang import SGLANG_LOAD
from engines.tgi import TGI_LOAD
from engines.vllm import VLLM_LOAD
from sidecar.telemetry.engine_load import engine_load
from sidecar.telemetry.metrics import TOKEN_GAP_BUCKETS, RequestHistogram


def test_request_histogram_writes_what_prometheus_clients_histogram_writes() -> None:
    """Filled a request at a time, the series are those of the library's own histogram fed value by value."""
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    bulk = RequestHistogram("sidecar_itl_seconds", "Gaps", TOKEN_GAP_BUCKETS)
    ours.register(bulk)
    reference = Histogram(
        "sidecar_itl_seconds", "Gaps", ["model", "engine"], buckets=TOKEN_GAP_BUCKETS, registry=theirs
    )
    generator = random.Random(7)
    for request in range(50):
        labels = ("m1", "vllm") if request % 3 else ("m2", "mock")
        # Bounds themselves included: a value equal to a bound belongs to that bucket ("le").
        gaps = [
            generator.choice([*TOKEN_GAP_BUCKETS, generator.uniform(0, 8)]) for _ in range(generator.randint(0, 40))
        ]
        bulk.observe(labels, gaps)
        for gap in gaps:
            reference.labels(*labels).observe(gap)

    def series(registry: CollectorRegistry) -> list[str]:
        return sorted(line for line in generate_latest(registry).decode().splitlines() if "_created" not in line)

    assert series(ours) == series(theirs)


def test_sorted_gaps_in_nanoseconds_fill_the_buckets_value_by_value_observation_would() -> None:
    """A request's gaps, sorted and in ns, bucketed by bisection per bound: the same buckets and count as the
    library's histogram fed each gap in seconds, bounds included; the same sum up to float rounding."""
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    bulk = RequestHistogram("sidecar_itl_seconds", "Gaps", TOKEN_GAP_BUCKETS)
    ours.register(bulk)
    reference = Histogram(
        "sidecar_itl_seconds", "Gaps", ["model", "engine"], buckets=TOKEN_GAP_BUCKETS, registry=theirs
    )
    bounds_ns = [round(bound * 1e9) for bound in TOKEN_GAP_BUCKETS]
    generator = random.Random(11)
    for request in range(50):
        labels = ("m1", "vllm") if request % 3 else ("m2", "mock")
        gaps_ns = sorted(
            generator.choice([*bounds_ns, bound + 1, generator.randint(0, 8 * 10**9)])
            for bound in generator.choices(bounds_ns, k=generator.randint(1, 40))
        )
        bulk.observe_sorted_ns(labels, gaps_ns)
        for gap in gaps_ns:
            reference.labels(*labels).observe(gap / 1e9)

    def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in registry.collect()
            for sample in family.samples
            if not sample.name.endswith("_created")
        }

    mine, library = samples(ours), samples(theirs)
    assert mine.keys() == library.keys()
    for key, value in library.items():
        if key[0].endswith("_sum"):
            assert mine[key] == pytest.approx(value, rel=1e-12)
        else:
            assert mine[key] == value, key


# Shaped as each engine writes them (names, labels, comments, histogram lines around the gauges).
VLLM_DP2 = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="Qwen/Qwen2.5 0.5B {x}"} 3.0
vllm:num_requests_running{engine="1",model_name="Qwen/Qwen2.5 0.5B {x}"} 4.0
vllm:num_requests_waiting{engine="0",model_name="Qwen/Qwen2.5 0.5B {x}"} 1.0
vllm:num_requests_waiting{engine="1",model_name="Qwen/Qwen2.5 0.5B {x}"} 2.0
vllm:num_requests_waiting_by_reason{engine="0",reason="capacity"} 9.0
vllm:kv_cache_usage_perc{engine="0",model_name="Qwen/Qwen2.5 0.5B {x}"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="Qwen/Qwen2.5 0.5B {x}"} 0.5
vllm:e2e_request_latency_seconds_bucket{engine="0",le="+Inf",model_name="q"} 12.0
"""
OLD_VLLM = "vllm:num_requests_running 1\nvllm:num_requests_waiting 0\nvllm:gpu_cache_usage_perc 0.125\n"
SGLANG = """sglang:num_running_reqs{model_name="m"} 5.0
sglang:num_queue_reqs{model_name="m"} 6.0
sglang:token_usage{model_name="m"} 0.75
"""
LLAMA_SERVER = "llamacpp:requests_processing 1\nllamacpp:requests_deferred 2\nllamacpp:kv_cache_usage_ratio 0.5\n"
TGI = "# TYPE tgi_queue_size gauge\ntgi_queue_size 7\ntgi_batch_current_size 8\ntgi_queue_size_extra 99\n"


def test_each_engines_load_is_read_under_its_own_names() -> None:
    assert engine_load(VLLM_DP2, VLLM_LOAD) == {"queued": 3.0, "running": 7.0, "kv_cache_usage": 0.5}
    assert engine_load(OLD_VLLM, VLLM_LOAD) == {"queued": 0.0, "running": 1.0, "kv_cache_usage": 0.125}
    assert engine_load(SGLANG, SGLANG_LOAD) == {"queued": 6.0, "running": 5.0, "kv_cache_usage": 0.75}
    assert engine_load(LLAMA_SERVER, LLAMA_SERVER_LOAD) == {"queued": 2.0, "running": 1.0, "kv_cache_usage": 0.5}
    assert engine_load(TGI, TGI_LOAD) == {"queued": 7.0, "running": 8.0}  # TGI has no KV cache series
    # An external engine may be any of them.
    for text in (VLLM_DP2, SGLANG, LLAMA_SERVER, TGI):
        assert engine_load(text, ANY_ENGINE_LOAD)
    assert engine_load("garbage\nvllm:num_requests_waiting not-a-number\n", VLLM_LOAD) == {}
