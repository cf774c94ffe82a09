"""The engine's load (requests queued and running, KV cache used), read from its own /metrics when the sidecar's
are scraped: never a stale figure."""

from __future__ import annotations

import httpx

from engines import LoadSeries
from sidecar.logs import get_logger

log = get_logger("sidecar.telemetry")

# A scrape of the sidecar waits this long at most for the engine's own metrics, then goes without them (a hung
# engine's figures are left out, never the last ones repeated). vLLM's /metrics takes up to 3 s on two busy cores:
# a shorter wait lost its load exactly when it was busiest.
ENGINE_METRICS_TIMEOUT_S = 3.0


async def read_engine_load(
    client: httpx.AsyncClient, url: str, headers: dict[str, str], series: LoadSeries
) -> dict[str, float] | None:
    """The load at `url` now; None when the engine does not answer 200 within ENGINE_METRICS_TIMEOUT_S."""
    try:
        answer = await client.get(url, headers=headers, timeout=ENGINE_METRICS_TIMEOUT_S)
    except httpx.HTTPError as exc:
        log.debug("engine_metrics_unread", error=str(exc) or exc.__class__.__name__)
        return None
    if answer.status_code != 200:
        log.debug("engine_metrics_unread", status=answer.status_code)
        return None
    return engine_load(answer.text, series)


def engine_load(exposition: str, series: LoadSeries) -> dict[str, float]:
    """The engine's load from its own Prometheus text: {"queued", "running", "kv_cache_usage"}, each under the
    first of the adapter's names the engine exports. A series' samples are summed (vLLM has one per data-parallel
    engine); for the KV cache, the fullest is the one that refuses work first: their highest.

    Read line by line (`series_samples`): vLLM's exposition is thousands of histogram lines, which a full parser would
    build into objects on every scrape."""
    kinds = {"queued": series.queued, "running": series.running, "kv_cache_usage": series.kv_cache_usage}
    samples = series_samples(exposition, *(name for names in kinds.values() for name in names))
    load: dict[str, float] = {}
    for kind, names in kinds.items():
        found = next((samples[name] for name in names if name in samples), None)
        if found:
            load[kind] = max(found) if kind == "kv_cache_usage" else sum(found)
    return load


def series_samples(exposition: str, *names: str) -> dict[str, list[float]]:
    """The values of the named series in a Prometheus text, by name (those absent left out), read line by line for
    those names alone; a sample whose value does not parse is skipped."""
    samples: dict[str, list[float]] = {}
    if not names:
        return samples
    for line in exposition.splitlines():
        if not line.startswith(names):
            continue
        name, labels_and_value = _split_sample(line)
        if name in names:
            try:
                samples.setdefault(name, []).append(float(labels_and_value.split()[0]))
            except (ValueError, IndexError):
                continue
    return samples


def _split_sample(line: str) -> tuple[str, str]:
    """`name{labels} value [timestamp]` -> (name, "value [timestamp]"); label values may hold spaces."""
    brace = line.find("{")
    space = line.find(" ")
    if brace != -1 and (space == -1 or brace < space):
        return line[:brace], line[line.rfind("}") + 1 :]
    return line[:space], line[space + 1 :]
