from __future__ import annotations

import pytest

from sidecar.dataplane.performance import ENGINE_TIMINGS_BYTES, PerformanceMeter
from sidecar.telemetry.stats import percentile

MS = 1_000_000


def test_percentile_interpolates_like_numpy() -> None:
    values = [1.0, 2.0, 3.0, 4.0]
    assert percentile(values, 50) == 2.5
    assert percentile(values, 90) == pytest.approx(3.7)
    assert percentile([5.0], 99) == 5.0


def test_metrics_follow_the_spec_definitions() -> None:
    meter = PerformanceMeter(start_ns=0, overhead_ns=MS // 2)
    for at_ms in (200, 220, 240, 270):  # first output at 200 ms, gaps 20, 20, 30
        meter.output(at_ms * MS)
    result = meter.result(300 * MS, {"prompt_tokens": 5, "completion_tokens": 4}, engine="mock", model="m")
    assert result["ttft_ms"] == 200.0
    assert result["latency_ms"] == 270.0
    assert result["total_ms"] == 300.0
    assert result["tpot_ms"] == pytest.approx((270 - 200) / 3, abs=1e-3)
    assert result["itl_ms"] == {"p50": 20.0, "p90": 28.0, "p99": 29.8, "max": 30.0}
    assert (result["prompt_tokens"], result["completion_tokens"]) == (5, 4)
    assert result["output_tokens_per_s"] == pytest.approx(4 / 0.070, abs=1e-3)
    assert result["sidecar_overhead_ms"] == 0.5
    assert (result["engine"], result["model"]) == ("mock", "m")
    assert result["gpu_memory_peak_mb"] is None
    assert "tokens_estimated" not in result


def test_without_usage_tokens_are_counted_and_marked_estimated() -> None:
    meter = PerformanceMeter(start_ns=0)
    meter.output(10 * MS)
    meter.output(15 * MS)
    result = meter.result(20 * MS, None, engine="e", model="m")
    assert result["completion_tokens"] == 2
    assert result["tokens_estimated"] is True
    assert result["prompt_tokens"] is None


def test_single_token_has_no_tpot_rate_or_itl() -> None:
    meter = PerformanceMeter(start_ns=0)
    meter.output(10 * MS)
    result = meter.result(12 * MS, {"completion_tokens": 1}, engine="e", model="m")
    assert (result["ttft_ms"], result["latency_ms"]) == (10.0, 10.0)
    assert result["tpot_ms"] is None and result["itl_ms"] is None and result["output_tokens_per_s"] is None


def test_no_output_at_all() -> None:
    result = PerformanceMeter(start_ns=0).result(5 * MS, {"completion_tokens": 0}, engine="e", model="m")
    assert result["ttft_ms"] is None and result["latency_ms"] is None and result["total_ms"] == 5.0


def test_engine_timings_are_kept_as_reported() -> None:
    meter = PerformanceMeter(start_ns=0)
    meter.output(MS)
    timings = {"prompt_ms": 1.5, "predicted_per_second": 40.2}
    result = meter.result(2 * MS, None, engine="llamacpp", model="m", engine_timings=timings)
    assert result["engine_timings"] == timings
    assert result["engine"] == "llamacpp"


@pytest.mark.parametrize(
    "timings",
    [{"notes": "x" * ENGINE_TIMINGS_BYTES}, {"prompt_ms": 2**70}],
    ids=["past the bound", "not writable as JSON"],
)
def test_engine_timings_past_the_bound_or_not_json_are_left_out(timings: dict[str, object]) -> None:
    meter = PerformanceMeter(start_ns=0)
    meter.output(MS)
    result = meter.result(2 * MS, None, engine="llamacpp", model="m", engine_timings=timings)
    assert "engine_timings" not in result and result["ttft_ms"] == 1.0


def test_several_choices_are_timed_per_choice() -> None:
    meter = PerformanceMeter(start_ns=0)
    for step in range(3):  # two choices, each 20 ms between its tokens, arriving 1 ms apart
        meter.output((100 + 20 * step) * MS, choice=0)
        meter.output((101 + 20 * step) * MS, choice=1)
    result = meter.result(150 * MS, {"completion_tokens": 6}, engine="e", model="m")
    assert result["ttft_ms"] == 100.0 and result["latency_ms"] == 141.0
    assert result["itl_ms"] == {"p50": 20.0, "p90": 20.0, "p99": 20.0, "max": 20.0}
    assert result["tpot_ms"] == pytest.approx(41 / 2, abs=1e-3)  # 3 tokens per choice
    assert result["output_tokens_per_s"] == pytest.approx(6 / 0.041, abs=1e-3)


def test_a_whole_body_has_latency_but_no_ttft() -> None:
    meter = PerformanceMeter(start_ns=0)
    meter.whole_body(80 * MS)
    result = meter.result(81 * MS, {"completion_tokens": 10}, engine="e", model="m")
    assert (result["ttft_ms"], result["latency_ms"], result["total_ms"]) == (None, 80.0, 81.0)
    assert result["tpot_ms"] is None and result["itl_ms"] is None and result["output_tokens_per_s"] is None


def test_events_read_together_are_counted_as_coalesced_not_as_zero_gaps() -> None:
    meter = PerformanceMeter(start_ns=0)
    for at_ms in (100, 120, 120, 120, 150):  # three events in the read at 120 ms
        meter.output(at_ms * MS)
    result = meter.result(160 * MS, {"completion_tokens": 5}, engine="mock", model="m")
    assert result["coalesced_events"] == 2
    assert result["itl_ms"] == {"p50": 25.0, "p90": 29.0, "p99": 29.9, "max": 30.0}  # 20 and 30: no zeros
    assert result["tpot_ms"] == pytest.approx(50 / 4, abs=1e-3)  # the average over the time observed


def test_a_whole_answer_in_one_read_has_no_tpot_itl_or_rate_rather_than_zeros() -> None:
    meter = PerformanceMeter(start_ns=0)
    for _ in range(8):
        meter.output(100 * MS)
    result = meter.result(101 * MS, {"completion_tokens": 8}, engine="mock", model="m")
    assert (result["ttft_ms"], result["latency_ms"]) == (100.0, 100.0)
    assert result["coalesced_events"] == 7
    assert (result["tpot_ms"], result["itl_ms"], result["output_tokens_per_s"]) == (None, None, None)


@pytest.mark.parametrize("reported", ["4", -4, 4.0, True, None])
def test_usage_that_is_not_a_count_of_tokens_is_not_reported_as_one(reported: object) -> None:
    meter = PerformanceMeter(start_ns=0)
    for at_ms in (10, 20):
        meter.output(at_ms * MS)
    result = meter.result(30 * MS, {"prompt_tokens": reported, "completion_tokens": reported}, engine="e", model="m")
    assert result["prompt_tokens"] is None
    assert result["completion_tokens"] == 2 and result["tokens_estimated"] is True


def test_the_responses_apis_input_and_output_tokens_are_its_prompt_and_completion() -> None:
    meter = PerformanceMeter(start_ns=0)
    meter.output(MS)
    meter.output(3 * MS)
    result = meter.result(4 * MS, {"input_tokens": 7, "output_tokens": 2}, engine="vllm", model="m")
    assert (result["prompt_tokens"], result["completion_tokens"]) == (7, 2) and "tokens_estimated" not in result
