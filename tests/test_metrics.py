from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from sidecar.metrics import TOKEN_GAP_BUCKETS, RequestHistogram


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
