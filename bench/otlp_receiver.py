"""An OTLP/HTTP receiver: what an OpenTelemetry collector's `otlp` receiver accepts on port 4318 (`/v1/traces`,
`/v1/metrics`, protobuf, gzip or not), decoded with the protocol's own definitions (`opentelemetry-proto`).

The tests run it in their process and read the spans and metrics it got; the bench runs it as a process of its
own (`python -m bench.otlp_receiver --port N`), a sink that answers as a collector does, so that what exporting
costs the sidecar is measured and not what receiving costs.
"""

from __future__ import annotations

import argparse
import gzip
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue


@dataclass
class Span:
    trace_id: str  # hex, as W3C traceparent writes it
    span_id: str
    parent_span_id: str  # "" for a root span
    name: str
    kind: int  # the protocol's SpanKind: 2 is SERVER
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    events: list[tuple[str, int]]  # (name, time in ns)
    status_code: int  # 0 unset, 1 ok, 2 error
    resource: dict[str, Any]


@dataclass
class HistogramPoint:
    metric: str
    unit: str
    attributes: dict[str, Any]
    count: int
    sum: float
    bounds: list[float]
    bucket_counts: list[int]
    resource: dict[str, Any]


@dataclass
class Received:
    spans: list[Span] = field(default_factory=list)
    # The latest point of each histogram series (cumulative: each export holds the totals so far), by
    # (process, metric, attributes).
    histograms: dict[tuple[str, str, str], HistogramPoint] = field(default_factory=dict)
    requests: int = 0


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return None if kind is None else getattr(value, kind)


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


class OtlpReceiver:
    """A receiver on a loopback port; `sink` keeps nothing (the bench's), else everything is decoded and kept."""

    def __init__(self, port: int = 0, sink: bool = False) -> None:
        self.received = Received()
        self._changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the exporters use it

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path == "/v1/traces":
                    answer = ExportTraceServiceResponse().SerializeToString()
                    if not sink:
                        receiver._traces(body)
                elif self.path == "/v1/metrics":
                    answer = ExportMetricsServiceResponse().SerializeToString()
                    if not sink:
                        receiver._metrics(body)
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # a line per export is noise

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _traces(self, body: bytes) -> None:
        request = ExportTraceServiceRequest.FromString(body)
        spans = []
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    spans.append(
                        Span(
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            name=span.name,
                            kind=span.kind,
                            start_ns=span.start_time_unix_nano,
                            end_ns=span.end_time_unix_nano,
                            attributes=_attributes(span.attributes),
                            events=[(event.name, event.time_unix_nano) for event in span.events],
                            status_code=span.status.code,
                            resource=resource,
                        )
                    )
        with self._changed:
            self.received.spans += spans
            self.received.requests += 1
            self._changed.notify_all()

    def _metrics(self, body: bytes) -> None:
        request = ExportMetricsServiceRequest.FromString(body)
        with self._changed:
            for resource_metrics in request.resource_metrics:
                resource = _attributes(resource_metrics.resource.attributes)
                process = str(resource.get("service.instance.id"))
                for scope_metrics in resource_metrics.scope_metrics:
                    for metric in scope_metrics.metrics:
                        if metric.WhichOneof("data") != "histogram":
                            continue
                        for point in metric.histogram.data_points:
                            attributes = _attributes(point.attributes)
                            key = (process, metric.name, repr(sorted(attributes.items())))
                            self.received.histograms[key] = HistogramPoint(
                                metric.name,
                                metric.unit,
                                attributes,
                                point.count,
                                point.sum,
                                list(point.explicit_bounds),
                                list(point.bucket_counts),
                                resource,
                            )
            self.received.requests += 1
            self._changed.notify_all()

    def wait_for(self, predicate: Callable[[Received], bool], timeout_s: float) -> Received:
        """Wait until what was received satisfies the predicate; TimeoutError past the deadline."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not predicate(self.received):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"the receiver did not get what was awaited in {timeout_s} s")
                self._changed.wait(left)
            return self.received

    def histograms(self, metric: str) -> list[HistogramPoint]:
        with self._changed:
            return [point for point in self.received.histograms.values() if point.metric == metric]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.otlp_receiver", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=4318)
    args = parser.parse_args()
    with OtlpReceiver(args.port, sink=True) as receiver:
        receiver._thread.join()


if __name__ == "__main__":
    main()
