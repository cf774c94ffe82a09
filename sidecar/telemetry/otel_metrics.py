"""OpenTelemetry's GenAI model-server metrics for each request: the numbers of `usage.performance`, in seconds.
Imported only where OpenTelemetry is on (`otel.py`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.metrics import Histogram
    from opentelemetry.sdk.metrics import MeterProvider

# The semantic conventions' advisory bucket boundaries.
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
TOKEN_BUCKETS = tuple(float(4**power) for power in range(14))  # 1, 4, 16, ... 67108864


class Instruments:
    """The GenAI model-server histograms, with the conventions' bucket boundaries."""

    def __init__(self, provider: MeterProvider) -> None:
        meter = provider.get_meter("sidecar")
        self.duration: Histogram = meter.create_histogram(
            "gen_ai.server.request.duration",
            unit="s",
            description="Time from the request's body read to the end of its answer, its wait in the queue included",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.ttft: Histogram = meter.create_histogram(
            "gen_ai.server.time_to_first_token",
            unit="s",
            description="Time to the first output token for successful responses (usage.performance.ttft_ms)",
            explicit_bucket_boundaries_advisory=TTFT_BUCKETS,
        )
        self.tpot: Histogram = meter.create_histogram(
            "gen_ai.server.time_per_output_token",
            unit="s",
            description="Time per output token after the first for successful responses (usage.performance.tpot_ms)",
            explicit_bucket_boundaries_advisory=TPOT_BUCKETS,
        )
        self.tokens: Histogram = meter.create_histogram(
            "gen_ai.client.token.usage",
            unit="{token}",
            description="Input and output tokens of each request",
            explicit_bucket_boundaries_advisory=TOKEN_BUCKETS,
        )

    def record(self, performance: Mapping[str, Any], attributes: Mapping[str, Any]) -> None:
        self.duration.record((performance["queue_ms"] + performance["total_ms"]) / 1000, attributes)
        if "error.type" not in attributes:
            if performance["ttft_ms"] is not None:
                self.ttft.record(performance["ttft_ms"] / 1000, attributes)
            if performance["tpot_ms"] is not None:
                self.tpot.record(performance["tpot_ms"] / 1000, attributes)
        if isinstance(performance["prompt_tokens"], int):
            self.tokens.record(performance["prompt_tokens"], {**attributes, "gen_ai.token.type": "input"})
        self.tokens.record(performance["completion_tokens"], {**attributes, "gen_ai.token.type": "output"})
