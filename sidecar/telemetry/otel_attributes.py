"""What a request's span and metrics say, in OpenTelemetry's GenAI semantic conventions: the attributes read from
the request's body as it starts, and those read from its `usage.performance` and last events as it ends.
Imported where OpenTelemetry is on (`otel.py`) and by the relay, for the finish reasons of parsed chunks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from sidecar.telemetry.records import Performance

# The Responses API is a chat in the conventions' terms (their operation names have none of its own).
_OPERATIONS = {
    "/v1/chat/completions": "chat",
    "/v1/responses": "chat",
    "/v1/completions": "text_completion",
    "/v1/embeddings": "embeddings",
}
# The request fields a span records, under the conventions' names.
_REQUEST_FIELDS = (
    ("max_completion_tokens", "gen_ai.request.max_tokens"),
    ("max_output_tokens", "gen_ai.request.max_tokens"),  # the Responses API's
    ("max_tokens", "gen_ai.request.max_tokens"),
    ("temperature", "gen_ai.request.temperature"),
    ("top_p", "gen_ai.request.top_p"),
    ("seed", "gen_ai.request.seed"),
)
# `usage.performance` fields a span carries as they are, under `sidecar.`.
_PERFORMANCE_FIELDS = (
    "ttft_ms",
    "tpot_ms",
    "latency_ms",
    "total_ms",
    "queue_ms",
    "output_tokens_per_s",
    "coalesced_events",
    "sidecar_overhead_ms",
    "gpu_memory_peak_mb",
    "gpu_memory_delta_mb",
)


def request_attributes(path: str, request_id: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """A request span's attributes from its path and body: the operation, the model asked for, its sampling
    fields."""
    operation = _OPERATIONS.get(path, "chat")
    model = body.get("model")
    attributes: dict[str, Any] = {"gen_ai.operation.name": operation, "sidecar.request_id": request_id}
    if isinstance(model, str):
        attributes["gen_ai.request.model"] = model
    if operation != "embeddings":
        attributes["gen_ai.request.stream"] = body.get("stream") is True
    for key, name in _REQUEST_FIELDS:
        value = body.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and name not in attributes:
            attributes[name] = value
    return attributes


@dataclass(frozen=True, slots=True)
class Answer:
    """How a request that reached the engine ended: what the span and the metrics are made of."""

    performance: Performance
    status: int | None
    error_type: str | None
    finish_reasons: Sequence[str]
    # A stream's last events (not parsed on their way: read here for the finish reasons and the response's id),
    # or the whole answer, parsed.
    final_events: Sequence[bytes | Mapping[str, Any]]
    client_disconnected: bool


def span_attributes(answer: Answer) -> dict[str, Any]:
    performance = answer.performance
    attributes: dict[str, Any] = {
        f"sidecar.{name}": value
        for name, value in performance.items()
        if name in _PERFORMANCE_FIELDS and value is not None
    }
    itl = performance.get("itl_ms")
    if itl:
        attributes |= {f"sidecar.itl_{quantile}_ms": value for quantile, value in itl.items()}
    if performance["ttft_ms"] is not None:
        attributes["gen_ai.response.time_to_first_chunk"] = performance["ttft_ms"] / 1000
    if isinstance(performance["prompt_tokens"], int):
        attributes["gen_ai.usage.input_tokens"] = performance["prompt_tokens"]
    attributes["gen_ai.usage.output_tokens"] = performance["completion_tokens"]
    if performance.get("tokens_estimated"):
        attributes["sidecar.tokens_estimated"] = True
    if answer.status is not None:
        attributes["http.response.status_code"] = answer.status
    if answer.client_disconnected:
        attributes["sidecar.client_disconnected"] = True
    reasons, response_id = list(answer.finish_reasons), None
    for raw in answer.final_events:
        chunk = _object(raw)
        response_id = response_id or (chunk.get("id") if isinstance(chunk.get("id"), str) else None)
        if not answer.finish_reasons:
            reasons += finish_reasons(chunk)
    if reasons:
        attributes["gen_ai.response.finish_reasons"] = reasons
    if response_id:
        attributes["gen_ai.response.id"] = response_id
    return attributes


def _object(raw: bytes | Mapping[str, Any]) -> Mapping[str, Any]:
    if not isinstance(raw, bytes):
        return raw
    try:
        value = orjson.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def finish_reasons(chunk: Mapping[str, Any]) -> list[str]:
    """The finish reasons a parsed chunk or answer gives, in its choices' order; a Messages API answer's (or its
    stream's `message_delta`'s) `stop_reason`."""
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        delta = chunk.get("delta")
        stopped = delta if chunk.get("type") == "message_delta" and isinstance(delta, dict) else chunk
        reason = stopped.get("stop_reason")
        return [reason] if isinstance(reason, str) else []
    return [c["finish_reason"] for c in choices if isinstance(c, dict) and isinstance(c.get("finish_reason"), str)]
