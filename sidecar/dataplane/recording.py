"""What a request leaves once it is answered: its `usage.performance`, its record in the history, its metrics, its
span and the fields of its access line."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from sidecar import request_state
from sidecar.dataplane.exchange import Exchange, dumps
from sidecar.dataplane.whole_usage import split_at_usage
from sidecar.errors import SidecarError
from sidecar.logs import get_logger
from sidecar.telemetry.history import RequestHistory
from sidecar.telemetry.otel import OpenTelemetry
from sidecar.telemetry.otel_attributes import Answer
from sidecar.telemetry.records import Performance, RequestRecord
from sidecar.telemetry.service import Telemetry

log = get_logger("sidecar.proxy")  # the proxy's lines, whichever of its modules writes them

# How long the end of an answer waits for the engine's count of the prompt (asked when the request went out; an
# engine that serves one request at a time answers it as the generation ends).
_PROMPT_COUNT_WAIT_S = 5.0


def performance_header(performance: Performance) -> bytes:
    """`usage.performance` as the X-Performance-Metrics header's value: compact JSON, ASCII."""
    return json.dumps(performance, separators=(",", ":")).encode()


class Recorder:
    """A finished exchange's measures, worked out once (`finish`), and its record (`record`, which the proxy's
    backlog runs once nothing more urgent waits)."""

    def __init__(
        self, telemetry: Telemetry, history: RequestHistory, worker: int | None, otel: OpenTelemetry | None
    ) -> None:
        self.telemetry = telemetry
        self.history = history
        self.worker = worker
        self.otel = otel

    def finish(self, exchange: Exchange, end_ns: int) -> Performance:
        engine = exchange.engine
        gpu_peak, gpu_delta = self.telemetry.gpu_memory(exchange.gpu_window)
        exchange.performance = exchange.meter.result(
            end_ns,
            exchange.measured_usage(),
            engine=engine.adapter.name,
            model=engine.served_model,
            engine_timings=exchange.timings,
            gpu_memory_peak_mb=gpu_peak,
            gpu_memory_delta_mb=gpu_delta,
        )
        return exchange.performance

    async def finish_counted(self, exchange: Exchange, end_ns: int) -> Performance:
        """`finish` for an answer whose usage the sidecar counts: once the engine's count of the prompt has come
        into the usage (or the wait for it is over). The time spent waiting is not the engine's: `end_ns` is."""
        task, exchange.prompt_count = exchange.prompt_count, None
        if task is not None:
            done, _ = await asyncio.wait({task}, timeout=_PROMPT_COUNT_WAIT_S)
            if not done:
                task.cancel()
                log.warning("prompt_count_late", waited_s=_PROMPT_COUNT_WAIT_S)
            elif (count := task.result()) is not None:
                exchange.usage = (exchange.usage or {}) | {"prompt_tokens": count}
        return self.finish(exchange, end_ns)

    @staticmethod
    def counted_usage(exchange: Exchange) -> dict[str, Any]:
        """Usage as the sidecar counted it (after `_finish`): output events, and the engine's count of the prompt
        where it gave one (null where it could not: `usage.performance.tokens_estimated` says so)."""
        assert exchange.performance is not None
        prompt = exchange.performance["prompt_tokens"]  # the engine's count, where it is one
        tokens = exchange.performance["completion_tokens"]
        total = None if prompt is None else prompt + tokens
        return {"prompt_tokens": prompt, "completion_tokens": tokens, "total_tokens": total}

    def with_performance(self, exchange: Exchange, body: dict[str, Any], now: int) -> tuple[bytes, bytes]:
        """The body with `usage.performance`, and the same object for the X-Performance-Metrics header. An answer
        assembled keeps the usage the engine streamed last, as its own whole answer has it (llama-server's of one
        choice, where `performance` counts them all)."""
        performance = exchange.performance or self.finish(exchange, now)
        usage = body.get("usage")
        body["usage"] = (usage if isinstance(usage, dict) else exchange.usage or {}) | {"performance": performance}
        return dumps(body), performance_header(performance)

    def with_performance_spliced(
        self, exchange: Exchange, parts: list[bytes], now: int
    ) -> tuple[list[bytes], bytes] | None:
        """As `with_performance`, for an answer (`parts`, as read) whose usage is at its end or head: `performance`
        written into the engine's bytes, the rest neither parsed nor copied (`whole_usage`); None where the usage
        is elsewhere."""
        found = split_at_usage(parts)
        if found is None:
            return None
        before, usage, after = found
        exchange.usage = usage
        performance = exchange.performance or self.finish(exchange, now)
        return [*before, dumps(usage | {"performance": performance}), *after], performance_header(performance)

    def record(self, exchange: Exchange, ended_ns: int) -> None:
        """Into the history for GET /v1/requests/{id}, the metrics, the span, and the request's access line, for a
        request that ended at `ended_ns` (wall clock)."""
        performance = exchange.performance
        assert performance is not None
        scope = exchange.scope
        state = request_state.of(scope)
        request_id = state.request_id
        record: RequestRecord = {
            "id": request_id,
            "object": "sidecar.request",
            "created": ended_ns // 1_000_000_000,
            "method": scope["method"],
            "path": scope["path"],
            "status": exchange.status,
            "client_disconnected": exchange.client_disconnected,
            "error": exchange.error,
            "performance": performance,
        }
        if self.worker is not None:
            record["worker"] = self.worker
        fingerprint = state.log_fields.get("key_fingerprint")
        if fingerprint is not None:  # whose it is: GET /v1/requests/{id} shows it to that key (or an admin key)
            record["_key_fingerprint"] = fingerprint
        self.history.add(request_id, record)
        self.telemetry.metrics.observe_performance(performance, exchange.meter.gaps_ns)
        if exchange.span is not None and self.otel is not None:
            self.otel.end_request(exchange.span, _answer(exchange, performance), ended_ns)
        fields = state.log_fields
        if exchange.client_disconnected:
            fields["client_disconnected"] = True
            if state.client_timed_out:  # cut off by the server: it left its answer unread
                fields["client_timed_out"] = True
        if exchange.error is not None:  # the status says 200: the line says what cut the stream
            fields["error"] = exchange.error
        fields.update({key: value for key, value in performance.items() if value is not None})


def _answer(exchange: Exchange, performance: Performance) -> Answer:
    """How the exchange ended, for its span: `error.type` is the sidecar's error code (or the engine's status)."""
    failure = exchange.failure
    status = failure[1] if failure is not None else exchange.status
    if exchange.client_disconnected:
        error_type: str | None = "client_disconnected"
    elif failure is not None:
        error_type = failure[0]
    elif exchange.error is not None:  # the stream was cut after its status went out
        error_type = exchange.error
    else:
        error_type = str(status) if status is not None and status >= 400 else None
    return Answer(
        performance,
        status,
        error_type,
        exchange.finish_reasons or (),
        exchange.final_events,
        exchange.client_disconnected,
    )


def unanswered(exc: BaseException) -> tuple[str, int | None]:
    """A request's end before the engine had it, as `error.type` and the status the client got."""
    if isinstance(exc, SidecarError):
        return exc.code or str(exc.status_code), exc.status_code
    if isinstance(exc, asyncio.CancelledError):
        return "client_disconnected", None
    return exc.__class__.__name__, None
