"""Prometheus series for `GET /metrics`, named `sidecar_…`, on the app's own registry.

The engine's own load (queued and running requests, KV cache use) is read from the engine's /metrics at each
scrape of the sidecar's and exported under the same names whatever the engine (`engine_load`); a scrape of the
engine that fails leaves those series out of that exposition, so that none is ever stale.

Labels stay bounded: route (the endpoint's template, `/v1/*` for passed-through paths, `other` for the
rest), status class, model and engine; never a request id or a key. Histogram buckets are made for LLM
latencies: TTFT from 10 ms to 60 s, ITL and TPOT from 1 ms to 5 s, latency up to 10 minutes.
"""

from __future__ import annotations

import threading
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import accumulate
from typing import Any, Protocol, TypedDict

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from sidecar.engine_state import EngineState
from sidecar.telemetry.records import Performance
from sidecar.telemetry.watchdog import ResourceWatchdog

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60)
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5, 5)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 600)

_LABELS = ("model", "engine")
_MB = 1024 * 1024


def route_label(path: str, known: frozenset[str]) -> str:
    """A request's path as its series' label: one of the sidecar's own routes, or the family it falls in (a
    label per path the clients make up would grow without bound)."""
    if path in known:
        return path
    if path.startswith("/v1/requests/"):
        return "/v1/requests/{request_id}"
    if path.startswith("/v1/model/"):
        return "/v1/model/*"
    if path.startswith("/v1/"):
        return "/v1/*"
    return "other"


class RequestHistogram(Collector):
    """A histogram filled once per request: each value dropped in its bucket by bisection, under one lock for
    all of a request's values. prometheus_client's observe() takes a lock and walks the buckets for each value;
    called for every ITL gap it cost 3 % of the sidecar's CPU under load."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float]) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = tuple(buckets)
        self._bounds_ns = tuple(round(bound * 1e9) for bound in self.bounds)  # exact: bounds have 9 decimals at most
        self._series: dict[tuple[str, ...], list[float]] = {}  # labels -> counts per bucket (+Inf last), sum
        self._lock = threading.Lock()

    def observe(self, labels: tuple[str, ...], values: Iterable[float]) -> None:
        bounds = self.bounds
        with self._lock:
            series = self._series.get(labels)
            if series is None:
                series = self._series[labels] = [0] * (len(bounds) + 2)
            for value in values:
                series[bisect_left(bounds, value)] += 1  # the first bucket whose bound is >= value: "le"
                series[-1] += value

    def observe_sorted_ns(self, labels: tuple[str, ...], sorted_ns: Sequence[int]) -> None:
        """Values in nanoseconds, in order (a request's token gaps): each bucket's count found by one bisection of
        the values per bound, however many values there are (bisecting each value into the buckets took 818 µs for
        a 4,000-token stream's gaps, this 27)."""
        counts = []
        below = 0
        for bound in self._bounds_ns:
            upto = bisect_right(sorted_ns, bound, below)  # values <= bound ("le"), the ones below it excluded
            counts.append(upto - below)
            below = upto
        counts.append(len(sorted_ns) - below)
        total = sum(sorted_ns) / 1e9
        with self._lock:
            series = self._series.get(labels)
            if series is None:
                series = self._series[labels] = [0] * (len(self.bounds) + 2)
            for bucket, count in enumerate(counts):
                series[bucket] += count
            series[-1] += total

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=list(_LABELS))
        with self._lock:
            copies = [(labels, list(series)) for labels, series in self._series.items()]
        for labels, series in copies:
            cumulative = list(accumulate(series[:-1]))
            edges = [repr(float(bound)) for bound in self.bounds] + ["+Inf"]  # as prometheus_client writes them
            family.add_metric(list(labels), buckets=list(zip(edges, cumulative, strict=True)), sum_value=series[-1])
        yield family


# Our series -> what the adapter's LoadSeries calls it.
_LOAD_GAUGES = (
    ("sidecar_engine_queued_requests", "queued", "Requests waiting in the engine's queue (the engine's own figure)"),
    ("sidecar_engine_running_requests", "running", "Requests the engine is generating (the engine's own figure)"),
    ("sidecar_engine_kv_cache_usage_ratio", "kv_cache_usage", "Used fraction of the engine's KV cache, 0 to 1"),
)


class _EngineLoadCollector(Collector):
    """The engine's load read for this exposition (`Metrics.exposition` sets it): absent when not read."""

    def __init__(self) -> None:
        self.current: tuple[tuple[str, str], dict[str, float]] | None = None

    def collect(self) -> Iterator[Metric]:
        for name, kind, documentation in _LOAD_GAUGES:
            family = GaugeMetricFamily(name, documentation, labels=list(_LABELS))
            if self.current is not None and kind in self.current[1]:
                family.add_metric(list(self.current[0]), self.current[1][kind])
            yield family


class Metrics:
    def __init__(
        self,
        watchdog: ResourceWatchdog,
        engine_status: Callable[[], EngineFigures] | None,
        known_routes: Iterable[str] = (),
    ) -> None:
        """`engine_status`: where the engine's state comes from, and with it the watchdog's resources are exported
        too (None in a data-plane worker, whose series are added to those of the process that has them).
        `known_routes`: the paths labelled as they are."""
        self.known_routes = frozenset(known_routes)
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "sidecar_requests",
            "Requests answered, by route, status class, model and engine",
            ["route", "status", "model", "engine"],
            registry=self.registry,
        )
        self.ttft = RequestHistogram("sidecar_ttft_seconds", "Time to first token", TTFT_BUCKETS)
        self.tpot = RequestHistogram("sidecar_tpot_seconds", "Time per output token", TOKEN_GAP_BUCKETS)
        self.itl = RequestHistogram(
            "sidecar_itl_seconds", "Gaps between output events (inter-token latency)", TOKEN_GAP_BUCKETS
        )
        self.latency = RequestHistogram(
            "sidecar_request_latency_seconds", "Start to last output event (end-to-end latency)", LATENCY_BUCKETS
        )
        for histogram in (self.ttft, self.tpot, self.itl, self.latency):
            self.registry.register(histogram)
        self.tokens = Counter(
            "sidecar_tokens", "Tokens, by kind (prompt, completion)", [*_LABELS, "kind"], registry=self.registry
        )
        if engine_status is not None:
            self.registry.register(_LiveCollector(watchdog, engine_status))
        self._engine_load = _EngineLoadCollector()
        self.registry.register(self._engine_load)
        # Each request's series, found by their labels in one dict lookup: prometheus_client's labels() takes a
        # lock and checks its arguments on every call. The labels are bounded, and so is this.
        self._children: dict[tuple[Counter, tuple[str, ...]], Any] = {}

    def _child(self, counter: Counter, labels: tuple[str, ...]) -> Any:
        child = self._children.get((counter, labels))
        if child is None:
            child = self._children[(counter, labels)] = counter.labels(*labels)
        return child

    def observe_request(self, path: str, status: int | None, fields: dict[str, Any]) -> None:
        status_class = f"{status // 100}xx" if status else "none"
        model, engine = str(fields.get("model", "")), str(fields.get("engine", ""))
        self._child(self.requests, (route_label(path, self.known_routes), status_class, model, engine)).inc()

    def observe_performance(self, performance: Performance, sorted_gaps_ns: list[int]) -> None:
        """A request's measures; its token gaps in order (`PerformanceMeter.result` sorts them)."""
        labels = (performance["model"], performance["engine"])
        measured = (
            (self.ttft, performance["ttft_ms"]),
            (self.tpot, performance["tpot_ms"]),
            (self.latency, performance["latency_ms"]),
        )
        for histogram, ms in measured:
            if ms is not None:
                histogram.observe(labels, (ms / 1000,))
        if sorted_gaps_ns:
            self.itl.observe_sorted_ns(labels, sorted_gaps_ns)
        for kind, count in (("prompt", performance["prompt_tokens"]), ("completion", performance["completion_tokens"])):
            if count:
                self._child(self.tokens, (*labels, kind)).inc(count)

    def watch_admission(self, admission: AdmissionCounts) -> None:
        self.registry.register(_AdmissionCollector(admission))

    def exposition(self, load: tuple[tuple[str, str], dict[str, float]] | None = None) -> bytes:
        """The Prometheus text, with the engine's load as just read ((model, engine) labels, values), if it was."""
        self._engine_load.current = load  # set and read in the same step: no other scrape comes between
        return generate_latest(self.registry)


class AdmissionCounts(Protocol):
    """What the admission gauges read (dataplane.admission.Admission)."""

    @property
    def active(self) -> int: ...
    @property
    def queued(self) -> int: ...
    @property
    def rejected(self) -> dict[str, int]: ...


class _AdmissionCollector(Collector):
    """The sidecar's own queue (admission control), read at scrape time."""

    def __init__(self, admission: AdmissionCounts) -> None:
        self.admission = admission

    def collect(self) -> Iterator[Metric]:
        admission = self.admission
        active = GaugeMetricFamily("sidecar_requests_active", "Generation requests admitted to the engine now")
        active.add_metric([], admission.active)
        queued = GaugeMetricFamily("sidecar_requests_queued", "Generation requests waiting in the sidecar's queue")
        queued.add_metric([], admission.queued)
        rejected = CounterMetricFamily(
            "sidecar_requests_rejected", "Requests answered 429 by admission control", labels=["reason"]
        )
        for reason, count in admission.rejected.items():
            rejected.add_metric([reason], count)
        yield from (active, queued, rejected)


class EngineFigures(TypedDict):
    """What the metrics read of the engine's status (control.records.EngineStatus has these and more)."""

    state: EngineState
    restarts: int
    load_time_s: float | None


class _LiveCollector(Collector):
    """Engine state and the watchdog's latest sample, read at scrape time."""

    def __init__(self, watchdog: ResourceWatchdog, engine_status: Callable[[], EngineFigures]) -> None:
        self.watchdog = watchdog
        self.engine_status = engine_status

    def collect(self) -> Iterator[Metric]:
        status = self.engine_status()
        state = GaugeMetricFamily("sidecar_engine_state", "1 for the engine's current state", labels=["state"])
        for name in EngineState:
            state.add_metric([name.value], 1.0 if status["state"] == name else 0.0)
        yield state
        restarts = CounterMetricFamily("sidecar_engine_restarts", "Restarts after the engine died")
        restarts.add_metric([], status["restarts"])
        yield restarts
        load = GaugeMetricFamily("sidecar_engine_load_seconds", "How long the current engine took to be ready")
        if status["load_time_s"] is not None:
            load.add_metric([], status["load_time_s"])
        yield load
        yield from self._resources()

    def _resources(self) -> Iterator[Metric]:
        sample = self.watchdog.latest()
        cpu = GaugeMetricFamily("sidecar_process_cpu_percent", "CPU use (100 = one core)", labels=["process"])
        rss = GaugeMetricFamily("sidecar_process_resident_memory_bytes", "Resident memory", labels=["process"])
        ram = GaugeMetricFamily("sidecar_system_memory_bytes", "System RAM", labels=["kind"])
        gpu_used = GaugeMetricFamily("sidecar_gpu_memory_used_bytes", "GPU memory used", labels=["gpu"])
        gpu_total = GaugeMetricFamily("sidecar_gpu_memory_total_bytes", "GPU memory", labels=["gpu"])
        gpu_util = GaugeMetricFamily("sidecar_gpu_utilization_percent", "GPU utilisation", labels=["gpu"])
        engine_gpu = GaugeMetricFamily("sidecar_engine_gpu_memory_bytes", "The engine processes' GPU memory")
        if sample is not None:
            cpu.add_metric(["sidecar"], sample.sidecar_cpu_pct)
            rss.add_metric(["sidecar"], sample.sidecar_rss_mb * _MB)
            if sample.engine_cpu_pct is not None and sample.engine_rss_mb is not None:
                cpu.add_metric(["engine"], sample.engine_cpu_pct)
                rss.add_metric(["engine"], sample.engine_rss_mb * _MB)
            ram.add_metric(["used"], sample.ram_used_mb * _MB)
            ram.add_metric(["total"], sample.ram_total_mb * _MB)
            for gpu in sample.gpus or ():
                gpu_used.add_metric([str(gpu.index)], gpu.used_mb * _MB)
                gpu_total.add_metric([str(gpu.index)], gpu.total_mb * _MB)
                if gpu.utilization_pct is not None:
                    gpu_util.add_metric([str(gpu.index)], gpu.utilization_pct)
            if sample.engine_gpu_mb is not None:
                engine_gpu.add_metric([], sample.engine_gpu_mb * _MB)
        yield from (cpu, rss, ram, gpu_used, gpu_total, gpu_util, engine_gpu)
        yield self._watchdog_intervals()

    def _watchdog_intervals(self) -> Metric:
        """A summary: quantiles over the watchdog's recent intervals, count and sum over all of them."""
        interval = Metric(
            "sidecar_watchdog_interval_seconds", "Real intervals between the watchdog's samples", "summary"
        )
        drift = self.watchdog.intervals_ms()
        for quantile, key in (("0.5", "p50"), ("0.99", "p99")):
            value = drift[key]
            if value is not None:
                interval.add_sample(interval.name, {"quantile": quantile}, float(value) / 1000)
        interval.add_sample(interval.name + "_count", {}, float(self.watchdog.intervals_total))
        interval.add_sample(interval.name + "_sum", {}, self.watchdog.intervals_sum_s)
        return interval
