"""The bench's numbers: ratios against direct per concurrency, a table for the terminal, and a chart."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from bench.loadgen import PhaseResult
from bench.machine import IDLE_S
from sidecar.telemetry.stats import percentile

# The spec's bounds against nginx in the same run: the TTFT the sidecar adds at one stream, over nginx's, and its CPU
# per relayed event (the cost split's per-chunk figure) over nginx's.
TTFT_OVER_NGINX_MS = 0.3
CPU_PER_EVENT_OVER_NGINX = 1.3


@dataclass
class _Merged:
    """One target's phases at one level, taken together."""

    ttfts: list[float]  # sorted
    path_ttfts: list[float] | None  # each client TTFT less the engine's own, where the engine said it for every one
    rate: float
    chunks: int
    errors: int
    first_error: str | None


def _merged(runs: list[PhaseResult]) -> _Merged:
    ttfts = sorted(t for run in runs for t in run.ttfts_ms)
    path_ttfts = sorted(t for run in runs for t in run.path_ttfts_ms)
    complete = path_ttfts if path_ttfts and len(path_ttfts) == len(ttfts) else None
    chunks = sum(run.chunks for run in runs)
    seconds = sum(run.seconds for run in runs)
    errors = sum(run.errors for run in runs)
    first_error = next((run.first_error for run in runs if run.first_error), None)
    return _Merged(ttfts, complete, chunks / seconds if seconds else 0.0, chunks, errors, first_error)


def _proxy_figures(direct: _Merged, runs: list[PhaseResult], cpu_s: float, peak_rss_mb: float) -> dict[str, Any]:
    proxied = _merged(runs)

    def q(values: list[float], level: float) -> float | None:
        return round(percentile(values, level), 3) if values else None

    # Where the engine said its own TTFT for every request, through the proxy and directly, added TTFT compares
    # the path's (the client's TTFT less the engine's): the engine's 1 ms clock moves a first token by up to a
    # millisecond, a proxy's whole added TTFT at low concurrency, and that blur does not cancel between two
    # phases of a few dozen requests. A proxy that drops the engine's field (LiteLLM's) is compared on client TTFTs.
    engine_timed = proxied.path_ttfts is not None and direct.path_ttfts is not None
    basis = (proxied.path_ttfts, direct.path_ttfts) if engine_timed else (proxied.ttfts, direct.ttfts)

    def added(level: float) -> float | None:
        a, b = q(basis[0] or [], level), q(basis[1] or [], level)
        return None if a is None or b is None else round(a - b, 3)

    cpu_per_chunk = cpu_s / proxied.chunks if proxied.chunks else None
    return {
        "proxied_ttft_p50_ms": q(proxied.ttfts, 50),
        "proxied_ttft_p99_ms": q(proxied.ttfts, 99),
        "added_ttft_p50_ms": added(50),
        "added_ttft_p99_ms": added(99),
        "added_ttft_engine_timed": engine_timed,
        "proxied_chunks_per_s": round(proxied.rate, 1),
        "throughput_ratio": round(proxied.rate / direct.rate, 3) if direct.rate else None,
        "errors": proxied.errors,
        "first_error": proxied.first_error,
        "proxy_cpu_s_per_1k_chunks": None if cpu_per_chunk is None else round(cpu_per_chunk * 1000, 4),
        "proxy_peak_rss_mb": round(peak_rss_mb, 1) if peak_rss_mb else None,
        # The share of one core the proxy would spend relaying the engine's direct rate: 2 or more, the engine
        # is at least twice as fast as the proxy can relay on a core, so the ratios measure the proxy.
        "core_share_at_direct_rate": None if cpu_per_chunk is None else round(cpu_per_chunk * direct.rate, 3),
    }


def summarize(
    concurrency: int,
    direct: list[PhaseResult],
    proxied: dict[str, tuple[list[PhaseResult], float, float]],
    main: str,
) -> dict[str, Any]:
    """One level's figures: the main proxy's at the top level, every other proxy's under its name."""
    merged = _merged(direct)
    figures = {name: _proxy_figures(merged, *measured) for name, measured in proxied.items()}
    level: dict[str, Any] = {
        "concurrency": concurrency,
        "direct_ttft_p50_ms": round(percentile(merged.ttfts, 50), 3) if merged.ttfts else None,
        "direct_ttft_p99_ms": round(percentile(merged.ttfts, 99), 3) if merged.ttfts else None,
        "direct_chunks_per_s": round(merged.rate, 1),
        "direct_errors": merged.errors,
        **figures[main],
    }
    level["first_error"] = level["first_error"] or merged.first_error
    for name, other in figures.items():
        if name != main:
            level[name] = other
            level[f"vs_{name}"] = _versus(figures[main], other)
    return level


def _versus(main: dict[str, Any], reference: dict[str, Any]) -> dict[str, float | None]:
    """The main proxy against the reference: CPU per chunk as a ratio, added TTFT p50 as a ratio and a difference."""

    def ratio(key: str) -> float | None:
        a, b = main[key], reference[key]
        return round(a / b, 3) if a is not None and b else None

    a, b = main["added_ttft_p50_ms"], reference["added_ttft_p50_ms"]
    return {
        "cpu_per_chunk_ratio": ratio("proxy_cpu_s_per_1k_chunks"),
        "added_ttft_p50_ratio": ratio("added_ttft_p50_ms") if b is not None and b > 0 else None,
        "added_ttft_p50_diff_ms": None if a is None or b is None else round(a - b, 3),
        "throughput_ratio": ratio("throughput_ratio"),
    }


def _proxies(results: dict[str, Any]) -> list[str]:
    """The proxies of a run: the sidecar, those compared with it, then the reference (nginx)."""
    return [results["proxy"], *results.get("compared", ())] + (
        [results["reference"]] if results.get("reference") else []
    )


def write_table(results: dict[str, Any], out: TextIO) -> None:
    proxies = _proxies(results)
    columns = (
        ("added_ttft_p50_ms", "+TTFT p50 ms"),
        ("added_ttft_p99_ms", "+TTFT p99 ms"),
        ("throughput_ratio", "chunks/s ratio"),
        ("errors", "errors"),
        ("proxy_cpu_s_per_1k_chunks", "CPU s/1k chunks"),
        ("core_share_at_direct_rate", "core share"),
        ("proxy_peak_rss_mb", "peak RSS MB"),
    )
    out.write(
        f"\n{' and '.join(proxies)} against a direct connection to the {results.get('engine', 'mock')} engine "
        f"({results['machine']['cpus']} CPUs, {results['machine']['platform']})\n"
    )
    if workers := results.get("sidecar_workers"):
        out.write(f"the sidecar with {workers} data-plane worker{'s' if workers > 1 else ''}\n")
    out.write("\n")
    titles = ["conc", "proxy", "direct chunks/s", *(title for _, title in columns)]
    out.write(" | ".join(titles) + "\n")
    out.write(" | ".join("-" * len(title) for title in titles) + "\n")
    for level in results["levels"]:
        for name in proxies:
            figures = level if name == results["proxy"] else level[name]
            cells = [level["concurrency"], name, level["direct_chunks_per_s"], *(figures[key] for key, _ in columns)]
            out.write(" | ".join(_cell(cell) for cell in cells) + "\n")
        if level["first_error"]:
            out.write(f"    first error: {level['first_error']}\n")
    timed = [
        name
        for name in proxies
        if all(
            (level if name == results["proxy"] else level[name])["added_ttft_engine_timed"]
            for level in results["levels"]
        )
    ]
    if timed:
        out.write(
            f"+TTFT of {', '.join(timed)}: the path's, each client TTFT less the engine's own TTFT for that request "
            "(the engine says it); of the others: client TTFTs compared\n"
        )
    for name, reason in results.get("skipped", {}).items():
        out.write(f"{name}: skipped: {reason}\n")
    for name in results.get("compared", ()):
        out.write(f"\n{name} against {results['proxy']}: CPU per chunk ratio, added TTFT p50 difference (ms)\n")
        for level in results["levels"]:
            versus = level[f"vs_{name}"]
            ratio = versus["cpu_per_chunk_ratio"]
            diff = versus["added_ttft_p50_diff_ms"]
            out.write(
                f"  {level['concurrency']} streams: {_cell(None if not ratio else round(1 / ratio, 3))}x CPU, "
                f"{_cell(None if diff is None else round(-diff, 3))} ms TTFT\n"
            )
    if results.get("reference"):
        name = results["reference"]
        out.write(f"\n{results['proxy']} against {name}: CPU per chunk ratio, added TTFT p50 difference (ms)\n")
        for level in results["levels"]:
            versus = level[f"vs_{name}"]
            diff = versus["added_ttft_p50_diff_ms"]
            bound = (
                f" (the spec: at most {TTFT_OVER_NGINX_MS} at one stream: {_met(diff, TTFT_OVER_NGINX_MS)})"
                if level["concurrency"] == 1
                else ""
            )
            out.write(
                f"  {level['concurrency']} streams: {_cell(versus['cpu_per_chunk_ratio'])}x CPU, "
                f"{_cell(diff)} ms TTFT{bound}\n"
            )
            if level["concurrency"] == 1 and (penalty := results["machine"].get("idle_penalty")):
                out.write(
                    f"    idle penalty {penalty}: Python took {penalty}x as long after {IDLE_S * 1000:g} ms idle as "
                    "kept busy; every Python step of the one-stream path pays it, nginx's mostly kernel path little of "
                    "it\n"
                )
    top = results["levels"][-1]
    share = top["core_share_at_direct_rate"]
    verdict = (
        "the engine streams at least twice what the proxy can relay on one core: the ratios measure the proxy"
        if share is not None and share >= 2
        else "the engine streams less than twice what the proxy can relay on one core: throughput ratios are "
        "bounded by the engine, CPU per chunk still measures the proxy"
    )
    out.write(f"\nengine check at {top['concurrency']} streams: core share {_cell(share)}; {verdict}\n")
    if results.get("cost_split"):
        out.write("\nCPU per request and per relayed chunk, apart (two stream lengths at the top concurrency)\n")
        splits = results["cost_split"]
        for name, split in splits.items():
            out.write(
                f"  {name}: {_cell(split['cpu_ms_per_request'])} ms per request, "
                f"{_cell(split['cpu_us_per_chunk'])} µs per chunk\n"
            )
        main, reference = splits.get(results["proxy"]), splits.get(results.get("reference"))
        for name in results.get("compared", ()):
            other = splits.get(name)
            if main and other:
                more = {key: _difference(other[key], main[key]) for key in ("cpu_ms_per_request", "cpu_us_per_chunk")}
                out.write(
                    f"  {name} - {results['proxy']}: {_cell(more['cpu_ms_per_request'])} ms per request, "
                    f"{_cell(more['cpu_us_per_chunk'])} µs per relayed chunk\n"
                )
        if main and reference:
            ratios = {
                key: _positive_ratio(main[key], reference[key]) for key in ("cpu_ms_per_request", "cpu_us_per_chunk")
            }
            per_chunk = ratios["cpu_us_per_chunk"]
            out.write(
                f"  {results['proxy']} / {results['reference']}: {_times(ratios['cpu_ms_per_request'])} per request, "
                f"{_times(per_chunk)} per relayed chunk (the spec: CPU per relayed event within "
                f"{CPU_PER_EVENT_OVER_NGINX}x of nginx's: {_met(per_chunk, CPU_PER_EVENT_OVER_NGINX)})\n"
            )
    if results.get("memory"):
        out.write("\nmemory of the proxy (MB): before / peak / after\n")
        for name, check in results["memory"].items():
            out.write(
                f"  {name}: {_cell(check['rss_before_mb'])} / {_cell(check['rss_peak_mb'])} / "
                f"{_cell(check['rss_after_mb'])}, {check['chunks']} chunks, {check['errors']} errors\n"
            )


def _positive_ratio(a: float | None, b: float | None) -> float | None:
    """a / b where both are positive: the cost split solves two phases for two unknowns, and on a noisy run a
    proxy's per-request cost can come out at or below zero, which makes no ratio."""
    return round(a / b, 2) if a is not None and b is not None and a > 0 and b > 0 else None


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 4)


def _met(value: float | None, bound: float) -> str:
    return "not measured" if value is None else "met" if value <= bound else "NOT met"


def _times(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio}x"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return str(value)


def write_chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    levels = results["levels"]
    x = [level["concurrency"] for level in levels]
    figure, (ttft, ratio) = plt.subplots(1, 2, figsize=(11, 4.2))
    proxies = _proxies(results)
    for name, marker in zip(proxies, "osd^v", strict=False):
        figures = levels if name == results["proxy"] else [level[name] for level in levels]
        for key, style in (("added_ttft_p50_ms", "-"), ("added_ttft_p99_ms", ":")):
            label = f"{name} {key[11:14]}"
            ttft.plot(x, [level[key] for level in figures], marker=marker, linestyle=style, label=label)
        ratio.plot(x, [level["throughput_ratio"] for level in figures], marker=marker, label=name)
    ttft.axhline(0, color="grey", linewidth=0.8)
    ttft.set(xscale="log", xlabel="concurrent streams", ylabel="ms", title="TTFT added by the proxy")
    ttft.set_yscale("symlog", linthresh=1)  # 1 ms at one stream and hundreds at saturation, on one axis
    ttft.legend()
    ratio.set(
        xscale="log",
        ylim=(0, 1.1),
        xlabel="concurrent streams",
        ylabel="proxied / direct",
        title="Throughput (chunks/s) relative to direct",
    )
    ratio.legend()
    figure.suptitle(f"{' and '.join(proxies)} vs direct, {results['machine']['cpus']} CPUs")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
