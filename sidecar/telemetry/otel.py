"""OpenTelemetry: every request as a span and as metrics in the GenAI semantic conventions, and the engine's control
operations (load, unload, sleep, wake, a crash) as spans, exported over OTLP/HTTP.

Off unless an OTLP endpoint is set: `SIDECAR_OTEL_EXPORTER_OTLP_ENDPOINT`, or the SDK's own
`OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_{TRACES,METRICS}_ENDPOINT` (the other `OTEL_*` variables, for
headers, timeouts, batching and the export interval, work as the SDK documents them). When off, OpenTelemetry is
not imported and the proxy tests one attribute for None per request.

A request's span is the model server's (kind SERVER, named `{operation} {model}`): it starts as the request's
body has been read, is the child of the client's `traceparent` where one came, and is the parent the engine is
told of (its own `traceparent`), so that the engine's spans (vLLM's `llm_request`) join the same trace. The
metrics are the numbers of `usage.performance`, in seconds.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.types import Scope

from sidecar import request_state
from sidecar.logs import get_logger
from sidecar.settings import Settings, SettingsError
from sidecar.telemetry.otel_attributes import Answer, request_attributes, span_attributes
from sidecar.telemetry.otel_metrics import Instruments

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span

log = get_logger("sidecar.otel")

SERVICE_NAME = "llm-sidecar"
# At exit, what is batched gets this long to go out: a collector that is down must not hold the sidecar's exit for
# the exporters' own timeouts and retries (10 s each by default).
EXIT_FLUSH_S = 3.0
# Spans go out in batches of this many unless OTEL_BSP_MAX_EXPORT_BATCH_SIZE says otherwise: encoding a span
# takes some 80 µs under the GIL, and the SDK's 512 held the event loop off for 40 ms at a time.
SPAN_BATCH = 64
_ENDPOINT_VARIABLES = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
)
# The client's trace context, as W3C Trace Context and Baggage carry it.
_CONTEXT_HEADERS = frozenset({b"traceparent", b"tracestate", b"baggage"})


def enabled(settings: Settings, environ: Mapping[str, str] = os.environ) -> bool:
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return bool(settings.otel_exporter_otlp_endpoint or any(environ.get(name) for name in _ENDPOINT_VARIABLES))


def header_secrets(environ: Mapping[str, str] = os.environ) -> list[str]:
    """The values of the exporters' headers (a collector's key, `OTEL_EXPORTER_OTLP_HEADERS=authorization=Bearer
    ...`), for the redactor: the engine inherits the variables as it does the container's others, and neither
    its output nor the sidecar's logs show them."""
    values = []
    for name in (
        "OTEL_EXPORTER_OTLP_HEADERS",
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
        "OTEL_EXPORTER_OTLP_METRICS_HEADERS",
    ):
        for pair in environ.get(name, "").split(","):
            _, _, value = pair.partition("=")
            if value.strip():
                values += [value.strip(), urllib.parse.unquote(value.strip())]
    return values


def from_settings(settings: Settings, process: str) -> OpenTelemetry | None:
    """The exporters for this process (`supervisor`, or `worker-N`), or None where no endpoint is set."""
    if not enabled(settings):
        return None
    return OpenTelemetry(settings.otel_exporter_otlp_endpoint, process)


def _signal_on(signal: str) -> bool:
    """`OTEL_TRACES_EXPORTER=none` (or METRICS) turns that signal off, as the SDK's own configuration does."""
    return os.environ.get(f"OTEL_{signal}_EXPORTER", "otlp").strip().lower() != "none"


def _check_protocol(signal: str) -> None:
    protocol = os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL") or os.environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
    )
    if protocol.strip() != "http/protobuf":
        raise SettingsError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL: the sidecar exports OTLP over HTTP (http/protobuf), not {protocol}: "
            "point it at the collector's HTTP port (4318)"
        )


class OpenTelemetry:
    """One process's tracer and meter, their exporters, and the GenAI instruments."""

    def __init__(self, endpoint: str | None, process: str) -> None:
        try:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.metrics import MeterProvider
            from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError:
            raise SettingsError(
                "an OTLP endpoint is set, but OpenTelemetry is not installed: install llm-sidecar[otel]"
            ) from None
        from opentelemetry import propagate, trace

        resource = Resource.create({"service.instance.id": f"{socket.gethostname()}:{os.getpid()}"})
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": SERVICE_NAME}))
        resource = resource.merge(Resource({"sidecar.process": process}))
        base = endpoint.rstrip("/") if endpoint else None
        self.tracer_provider: TracerProvider | None = None
        self.meter_provider: MeterProvider | None = None
        if _signal_on("TRACES"):
            _check_protocol("TRACES")
            self.tracer_provider = TracerProvider(resource=resource, shutdown_on_exit=False)
            exporter = OTLPSpanExporter(endpoint=f"{base}/v1/traces" if base else None)
            batch = None if os.environ.get("OTEL_BSP_MAX_EXPORT_BATCH_SIZE") else SPAN_BATCH
            self.tracer_provider.add_span_processor(BatchSpanProcessor(exporter, max_export_batch_size=batch))
        if _signal_on("METRICS"):
            _check_protocol("METRICS")
            exporter_m = OTLPMetricExporter(endpoint=f"{base}/v1/metrics" if base else None)
            self.meter_provider = MeterProvider(
                resource=resource, metric_readers=[PeriodicExportingMetricReader(exporter_m)], shutdown_on_exit=False
            )
        self._propagate = propagate
        self._trace = trace
        self._tracer = self.tracer_provider.get_tracer("sidecar") if self.tracer_provider else None
        self._instruments = Instruments(self.meter_provider) if self.meter_provider else None
        log.info(
            "otel_exporting", process=process, traces=self._tracer is not None, metrics=self._instruments is not None
        )

    # -- requests ---------------------------------------------------------------------------------------------

    def start_request(self, scope: Scope, body: Mapping[str, Any]) -> RequestSpan:
        """The span of a request whose body was just read: the child of the client's trace context, if any."""
        attributes = request_attributes(scope["path"], request_state.of(scope).request_id, body)
        operation, model = attributes["gen_ai.operation.name"], attributes.get("gen_ai.request.model")
        span = None
        if self._tracer is not None:
            carrier = {
                name.decode("latin-1"): value.decode("latin-1")
                for name, value in scope["headers"]
                if name in _CONTEXT_HEADERS
            }
            parent = self._propagate.extract(carrier) if carrier else None
            name = f"{operation} {model}" if isinstance(model, str) else operation
            span = self._tracer.start_span(name, parent, kind=self._trace.SpanKind.SERVER, attributes=attributes)
        return RequestSpan(span, attributes)

    def context_headers(self, request: RequestSpan) -> dict[str, str]:
        """The trace context for the engine's request: this span as its parent."""
        if request.span is None:
            return {}
        carrier: dict[str, str] = {}
        self._propagate.inject(carrier, context=self._trace.set_span_in_context(request.span))
        return carrier

    def end_request(self, request: RequestSpan, answer: Answer, end_ns: int) -> None:
        """The request's end at `end_ns` (wall clock): its span ended and its metrics recorded, from its
        `usage.performance` and how it ended. Called with the request's record, which the proxy's backlog writes
        once nothing more urgent waits (`sidecar/dataplane/backlog.py`)."""
        if request.ended:
            return
        request.ended = True
        performance = answer.performance
        attributes = request.attributes
        common = {
            "gen_ai.operation.name": attributes["gen_ai.operation.name"],
            "gen_ai.provider.name": performance["engine"],
            "gen_ai.response.model": performance["model"],
        }
        if "gen_ai.request.model" in attributes:
            common["gen_ai.request.model"] = attributes["gen_ai.request.model"]
        if answer.error_type is not None:
            common["error.type"] = answer.error_type
        if self._instruments is not None:
            self._instruments.record(performance, common)
        span = request.span
        if span is None:
            return
        span.set_attributes(common)
        span.set_attributes(span_attributes(answer))
        ttft_ms = performance["ttft_ms"]
        if ttft_ms is not None:
            span.add_event("gen_ai.first_token", timestamp=request.start_time_ns + int(ttft_ms * 1e6))
        if answer.error_type is not None:
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, answer.error_type))
        span.end(end_time=end_ns)

    def end_unanswered(self, request: RequestSpan, error_type: str, status: int | None = None) -> None:
        """A request that never reached the engine (queue full, no engine ready, the client gone while queued)."""
        span = request.span
        if span is None or request.ended:
            return
        request.ended = True
        span.set_attribute("error.type", error_type)
        if status is not None:
            span.set_attribute("http.response.status_code", status)
        span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, error_type))
        span.end()

    # -- control operations -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def control(self, operation: str, attributes: Mapping[str, Any]) -> Iterator[ControlSpan]:
        """A span around one control operation (`sidecar.load`, ...); the body says how it ended."""
        span = None
        if self._tracer is not None:
            span = self._tracer.start_span(f"sidecar.{operation}", attributes=dict(attributes))
        outcome = ControlSpan()
        try:
            yield outcome
        finally:
            if span is not None:
                span.set_attributes(outcome.attributes)
                if outcome.error_type is not None:
                    span.set_attribute("error.type", outcome.error_type)
                    span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, outcome.error_type))
                span.end()

    def shutdown(self, timeout_s: float = EXIT_FLUSH_S) -> None:
        """What is batched goes out, for `timeout_s` at most (the exporters' threads are daemons: an export still
        retrying then does not keep the process)."""

        def flush() -> None:
            if self.tracer_provider is not None:
                self.tracer_provider.shutdown()
            if self.meter_provider is not None:
                self.meter_provider.shutdown()

        flushing = threading.Thread(target=flush, name="otel-flush", daemon=True)
        flushing.start()
        flushing.join(timeout_s)


class RequestSpan:
    """A request's span (None where only metrics are exported) and the attributes its metrics share."""

    __slots__ = ("span", "attributes", "start_time_ns", "ended")

    def __init__(self, span: Span | None, attributes: dict[str, Any]) -> None:
        self.span = span
        self.attributes = attributes
        # The span's clock is the wall clock; the first token's event is placed from the span's own start.
        self.start_time_ns = getattr(span, "start_time", None) or time.time_ns()
        self.ended = False


@dataclass(slots=True)
class ControlSpan:
    """What a control operation's body tells its span: attributes learnt on the way, and its error if it failed."""

    attributes: dict[str, Any] = field(default_factory=dict)
    error_type: str | None = None
