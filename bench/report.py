"""The bench's numbers: ratios against direct per concurrency, a table for the terminal, and a chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TextIO

from bench.loadgen import PhaseResult
from sidecar.performance import percentile

# Issue 5's targets on a 2-core machine that runs load generator, engine and sidecar together.
TARGETS = {
    1: {"added_ttft_p50_ms": 1.0},
    32: {"added_ttft_p50_ms": 2.0, "throughput_ratio": 0.95},
    256: {"throughput_ratio": 0.85},
    1024: {"throughput_ratio": 0.80, "errors": 0},
}


def _merged(runs: list[PhaseResult]) -> tuple[list[float], float, int, int, str | None]:
    ttfts = sorted(t for run in runs for t in run.ttfts_ms)
    chunks = sum(run.chunks for run in runs)
    seconds = sum(run.seconds for run in runs)
    errors = sum(run.errors for run in runs)
    first_error = next((run.first_error for run in runs if run.first_error), None)
    return ttfts, chunks / seconds if seconds else 0.0, chunks, errors, first_error


def summarize(
    concurrency: int, direct: list[PhaseResult], proxied: list[PhaseResult], cpu_s: float, peak_rss_mb: float
) -> dict[str, Any]:
    d_ttft, d_rate, _, d_errors, d_error = _merged(direct)
    p_ttft, p_rate, p_chunks, p_errors, p_error = _merged(proxied)

    def q(values: list[float], level: float) -> float | None:
        return round(percentile(values, level), 3) if values else None

    def added(level: float) -> float | None:
        a, b = q(p_ttft, level), q(d_ttft, level)
        return None if a is None or b is None else round(a - b, 3)

    level = {
        "concurrency": concurrency,
        "direct_ttft_p50_ms": q(d_ttft, 50),
        "direct_ttft_p99_ms": q(d_ttft, 99),
        "proxied_ttft_p50_ms": q(p_ttft, 50),
        "proxied_ttft_p99_ms": q(p_ttft, 99),
        "added_ttft_p50_ms": added(50),
        "added_ttft_p99_ms": added(99),
        "direct_chunks_per_s": round(d_rate, 1),
        "proxied_chunks_per_s": round(p_rate, 1),
        "throughput_ratio": round(p_rate / d_rate, 3) if d_rate else None,
        "direct_errors": d_errors,
        "errors": p_errors,
        "first_error": p_error or d_error,
        "proxy_cpu_s_per_1k_chunks": round(cpu_s / (p_chunks / 1000), 4) if p_chunks else None,
        "proxy_peak_rss_mb": round(peak_rss_mb, 1) if peak_rss_mb else None,
    }
    level["targets_met"] = _targets_met(level)
    return level


def _targets_met(level: dict[str, Any]) -> bool | None:
    targets = TARGETS.get(level["concurrency"])
    if targets is None:
        return None
    met = True
    for name, bound in targets.items():
        value = level[name]
        if value is None:
            return False
        met &= value <= bound if name in {"added_ttft_p50_ms", "errors"} else value >= bound
    return met


def write_table(results: dict[str, Any], out: TextIO) -> None:
    columns = (
        ("concurrency", "conc"),
        ("added_ttft_p50_ms", "+TTFT p50 ms"),
        ("added_ttft_p99_ms", "+TTFT p99 ms"),
        ("throughput_ratio", "chunks/s ratio"),
        ("direct_chunks_per_s", "direct chunks/s"),
        ("errors", "errors"),
        ("proxy_cpu_s_per_1k_chunks", "CPU s/1k chunks"),
        ("proxy_peak_rss_mb", "peak RSS MB"),
        ("targets_met", "target met"),
    )
    out.write(
        f"\n{results['proxy']} against a direct connection to the mock engine "
        f"({results['machine']['cpus']} CPUs, {results['machine']['platform']})\n\n"
    )
    out.write(" | ".join(title for _, title in columns) + "\n")
    out.write(" | ".join("-" * len(title) for _, title in columns) + "\n")
    for level in results["levels"]:
        out.write(" | ".join(_cell(level[key]) for key, _ in columns) + "\n")
        if level["first_error"]:
            out.write(f"    first error: {level['first_error']}\n")
    if results.get("memory"):
        out.write("\nmemory of the proxy (MB): before / peak / after\n")
        for name, check in results["memory"].items():
            out.write(
                f"  {name}: {_cell(check['rss_before_mb'])} / {_cell(check['rss_peak_mb'])} / "
                f"{_cell(check['rss_after_mb'])}, {check['chunks']} chunks, {check['errors']} errors\n"
            )


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
    for key, label in (("added_ttft_p50_ms", "p50"), ("added_ttft_p99_ms", "p99")):
        ttft.plot(x, [level[key] for level in levels], marker="o", label=label)
    ttft.axhline(0, color="grey", linewidth=0.8)
    ttft.set(xscale="log", xlabel="concurrent streams", ylabel="ms", title="TTFT added by the proxy")
    ttft.set_yscale("symlog", linthresh=1)  # 1 ms at one stream and hundreds at saturation, on one axis
    ttft.legend()
    ratio.plot(x, [level["throughput_ratio"] for level in levels], marker="o", label=results["proxy"])
    ratio.plot(
        [c for c in TARGETS if "throughput_ratio" in TARGETS[c]],
        [t["throughput_ratio"] for t in TARGETS.values() if "throughput_ratio" in t],
        linestyle="--",
        color="grey",
        label="target",
    )
    ratio.set(
        xscale="log",
        ylim=(0, 1.1),
        xlabel="concurrent streams",
        ylabel="proxied / direct",
        title="Throughput (chunks/s) relative to direct",
    )
    ratio.legend()
    figure.suptitle(f"{results['proxy']} vs direct, {results['machine']['cpus']} CPUs")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
