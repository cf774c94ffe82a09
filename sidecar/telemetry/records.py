"""What is measured of one request, typed: `usage.performance` (as the spec names its fields) and the record
`GET /v1/requests/{id}` answers with. Plain dicts at run time: they go out as JSON as they are."""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict


class InterTokenLatency(TypedDict):
    p50: float
    p90: float
    p99: float
    max: float


class Performance(TypedDict):
    ttft_ms: float | None  # null for an answer that came whole (no stream)
    latency_ms: float | None
    total_ms: float
    queue_ms: float
    tpot_ms: float | None
    itl_ms: InterTokenLatency | None
    prompt_tokens: int | None
    completion_tokens: int
    output_tokens_per_s: float | None
    coalesced_events: int
    gpu_memory_peak_mb: float | None
    gpu_memory_delta_mb: float | None
    sidecar_overhead_ms: float
    engine: str
    model: str
    tokens_estimated: NotRequired[bool]  # the engine reported no completion tokens: the output events counted
    engine_timings: NotRequired[dict[str, Any]]  # the engine's own timings, as it reported them


class RequestRecord(TypedDict):
    id: str
    object: str  # "sidecar.request"
    created: int
    method: str
    path: str
    status: int | None
    client_disconnected: bool
    error: str | None
    performance: Performance
    worker: NotRequired[int]  # with data-plane workers: which one served it
    _key_fingerprint: NotRequired[str]  # whose it is (never shown): the key that made it may read it
