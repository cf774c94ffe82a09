"""`usage.performance`: the metrics of one request, as the spec defines them (vLLM's TTFT, TPOT, ITL, E2EL).

Times come from one monotonic clock in nanoseconds; the clock starts when the request's body has been read and
the request is admitted (`queue_ms` is the time it waited for that in the sidecar's queue, outside TTFT).
With several choices (`n` > 1), ITL gaps are taken within each choice and TPOT divides by each choice's share
of the tokens: the spec's formulas for one sequence, applied per sequence.

Events that arrive in one read of the engine's stream (a busy machine, an engine that writes in batches) share
its timestamp: the time between them was not observed. They are counted as `coalesced_events`, their zero gaps
left out of ITL, and TPOT and tokens/s are null when every output event came in the same read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from sidecar.telemetry.records import InterTokenLatency, Performance
from sidecar.telemetry.stats import percentile


def _count(value: Any) -> int | None:
    """A count of tokens from the engine's usage, or None for what is not one (text, a negative number, true):
    the engine's usage is untrusted input, and the metrics add it up."""
    return value if type(value) is int and value >= 0 else None


# Anthropic's Messages API counts a prompt's cached tokens apart from its `input_tokens`, the rest of it.
_CACHED_INPUT = ("cache_read_input_tokens", "cache_creation_input_tokens")


def _prompt_tokens(usage: dict[str, Any]) -> int | None:
    """The prompt's tokens: chat's `prompt_tokens`, or the Responses and Messages APIs' `input_tokens` (with the
    Messages API's cached tokens, which it counts apart)."""
    if "prompt_tokens" in usage:
        return _count(usage["prompt_tokens"])
    count = _count(usage.get("input_tokens"))
    for key in _CACHED_INPUT:
        if count is not None and key in usage:
            cached = _count(usage[key])
            count = None if cached is None else count + cached
    return count


# The engine's own timings are kept as reported up to this much JSON (llama.cpp's, vLLM's and TGI's are 150-300
# bytes): they ride in the X-Performance-Metrics header, which a proxy in front refuses past its buffer for the
# whole head (nginx's proxy_buffer_size: 4 KiB by default), and in each of the history's thousand records.
ENGINE_TIMINGS_BYTES = 2048


def _kept_timings(timings: dict[str, Any]) -> bool:
    try:
        return len(orjson.dumps(timings)) <= ENGINE_TIMINGS_BYTES
    except TypeError:  # what orjson cannot write (an integer past 64 bits, nesting past 254 levels): not timings
        return False


def _ms(ns: int | float) -> float:
    return round(ns / 1e6, 3)


@dataclass
class PerformanceMeter:
    start_ns: int
    first_output_ns: int | None = None
    last_output_ns: int | None = None
    output_events: int = 0
    queue_ns: int = 0  # before start_ns: waiting in the sidecar's queue for admission
    overhead_ns: int = 0  # time the sidecar spent on the request itself, added up by the proxy
    gaps_ns: list[int] = field(default_factory=list)
    last_by_choice: dict[int, int] = field(default_factory=dict)
    coalesced_events: int = 0  # output events read together with the one before them: no gap was observed

    def output(self, now_ns: int, choice: int = 0) -> None:
        """One event carrying generated output for `choice` arrived at now_ns."""
        last = self.last_by_choice.get(choice)
        if last == now_ns:
            self.coalesced_events += 1
        elif last is not None:
            self.gaps_ns.append(now_ns - last)
        elif self.first_output_ns is None:
            self.first_output_ns = now_ns
        self.last_by_choice[choice] = now_ns
        self.last_output_ns = now_ns
        self.output_events += 1

    def whole_body(self, now_ns: int) -> None:
        """A non-streamed answer arrived whole at now_ns: its latency is known, its TTFT is not."""
        self.last_output_ns = now_ns

    def result(
        self,
        end_ns: int,
        usage: dict[str, Any] | None,
        *,
        engine: str,
        model: str,
        engine_timings: dict[str, Any] | None = None,
        gpu_memory_peak_mb: float | None = None,
        gpu_memory_delta_mb: float | None = None,
    ) -> Performance:
        ttft_ns = None if self.first_output_ns is None else self.first_output_ns - self.start_ns
        latency_ns = None if self.last_output_ns is None else self.last_output_ns - self.start_ns
        usage = usage or {}
        # Chat and completions count prompt and completion tokens; the Responses and Messages APIs, input and output.
        reported = _count(usage.get("completion_tokens", usage.get("output_tokens")))
        estimated = reported is None
        completion_tokens = self.output_events if reported is None else reported
        per_sequence = completion_tokens / max(1, len(self.last_by_choice))
        decode_ns = latency_ns - ttft_ns if latency_ns is not None and ttft_ns is not None else None
        tpot = _ms(decode_ns / (per_sequence - 1)) if decode_ns and per_sequence > 1 else None
        rate = round(completion_tokens / (decode_ns / 1e9), 3) if decode_ns else None
        gaps = self.gaps_ns
        gaps.sort()  # in place: the ITL histogram takes them in order too
        itl = None
        if gaps:
            p50, p90, p99 = (_ms(percentile(gaps, q)) for q in (50, 90, 99))
            itl = InterTokenLatency(p50=p50, p90=p90, p99=p99, max=_ms(gaps[-1]))
        performance: Performance = {
            "ttft_ms": None if ttft_ns is None else _ms(ttft_ns),
            "latency_ms": None if latency_ns is None else _ms(latency_ns),
            "total_ms": _ms(end_ns - self.start_ns),
            "queue_ms": _ms(self.queue_ns),
            "tpot_ms": tpot,
            "itl_ms": itl,
            "prompt_tokens": _prompt_tokens(usage),
            "completion_tokens": completion_tokens,
            "output_tokens_per_s": rate,
            "coalesced_events": self.coalesced_events,
            "gpu_memory_peak_mb": gpu_memory_peak_mb,
            "gpu_memory_delta_mb": gpu_memory_delta_mb,
            "sidecar_overhead_ms": _ms(self.overhead_ns),
            "engine": engine,
            "model": model,
        }
        if estimated:
            performance["tokens_estimated"] = True
        if engine_timings and _kept_timings(engine_timings):
            # The spec's `engine` key already names the engine: its own timings sit beside it, as reported.
            performance["engine_timings"] = engine_timings
        return performance
