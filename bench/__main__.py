"""`python -m bench`: the sidecar's cost against a direct connection to the engine and against nginx, in one run.

It starts the sidecar with an engine loaded (the bench's fast fake engine, the mock engine, or `--engine llamacpp
--model X.gguf`) and, when nginx is installed, nginx in front of the same engine; then it drives streaming chat load
at each concurrency against the engine directly, through nginx and through the sidecar, alternating, and reports
ratios: TTFT added by each proxy, throughput (chunks per second) relative to direct, errors, and each proxy's CPU per
relayed chunk and memory. `--target URL` measures another OpenAI-compatible proxy instead of the sidecar, in
front of the fake engine the bench starts on `--engine-port` (point the proxy there first). `--workers 1,2`
measures the sidecar once per count of data-plane workers (`SIDECAR_WORKERS`) and adds a scaling table: relayed
chunks/s at the top concurrency per count, against one worker, with direct and nginx from each run. `--otel` adds
a second sidecar in front of the same engine with OpenTelemetry on (spans and metrics to an OTLP sink the bench
runs, `bench/otlp_receiver.py`): what tracing costs, against the sidecar with it off, in the same run. `--peers
litellm,vllm-router` puts the proxies users would pick instead beside them, in front of the same engine
(`bench/peers.py` installs each on demand; one it cannot install or start is skipped, saying why).
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import sys
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import uvloop
from tqdm import tqdm

from bench import machine
from bench.loadgen import LoadProcesses, PhaseResult, chat_body, new_session, run_phase, stream_once
from bench.processes import ProcessMeter
from bench.report import summarize, write_chart, write_table
from bench.targets import Targets, add_target_options, running

_OWN_ENGINES = ("fast", "mock")  # the bench's fake engines, which take a request's "mock" overrides
# run_phase without its session: (target, url, headers, body, concurrency, seconds).
Phase = Callable[[str, str, dict[str, str], bytes, int, float], Awaitable[PhaseResult]]


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _measure(args: argparse.Namespace, targets: Targets) -> dict[str, Any]:
    spread = LoadProcesses(args.load_processes) if args.load_processes > 1 else None
    try:
        return await _measure_with(args, targets, spread)
    finally:
        if spread:
            spread.close()


def _phases(spread: LoadProcesses | None, session: aiohttp.ClientSession) -> Phase:
    """Phases on this process's loop and session, or shared out between the load processes."""
    return spread.run_phase if spread else functools.partial(run_phase, session)


async def _measure_with(args: argparse.Namespace, targets: Targets, spread: LoadProcesses | None) -> dict[str, Any]:
    headers = {name: _headers(key) for name, key in targets.keys.items()}
    body = chat_body(args.tokens, model=targets.model, history=args.history_bytes, extra=args.request_extra)
    urls = {"direct": targets.direct} | {proxy.name: proxy.url for proxy in targets.proxies}
    pids = {proxy.name: proxy.pid for proxy in targets.proxies}
    levels: list[dict[str, Any]] = []
    phases = len(args.concurrency) * args.rounds * len(urls)
    with tqdm(total=phases, desc="phases", unit="phase", file=sys.stderr) as progress:
        for concurrency in args.concurrency:
            async with new_session(concurrency) as session:
                phase = _phases(spread, session)
                runs: dict[str, list[PhaseResult]] = {name: [] for name in urls}
                cpu_s = dict.fromkeys(pids, 0.0)
                peak_rss = dict.fromkeys(pids, 0.0)
                for name, url in urls.items():  # warm every path: connections, caches, the engine
                    await phase("warm-up", url + "/v1/chat/completions", headers[name], body, concurrency, 1)
                for round_index in range(args.rounds):
                    order = list(urls)
                    for name in order if round_index % 2 == 0 else reversed(order):
                        progress.set_postfix_str(f"c={concurrency} {name}")
                        with ProcessMeter(pids.get(name), targets.engine_pid) as meter:
                            url = urls[name] + "/v1/chat/completions"
                            result = await phase(name, url, headers[name], body, concurrency, args.seconds)
                        if name in pids:
                            cpu_s[name] += meter.cpu_s
                            peak_rss[name] = max(peak_rss[name], meter.peak_rss_mb)
                        runs[name].append(result)
                        progress.update()
                proxied = {name: (runs[name], cpu_s[name], peak_rss[name]) for name in pids}
                levels.append(summarize(concurrency, runs["direct"], proxied, targets.proxy.name))
    own = args.engine in _OWN_ENGINES
    memory = await _memory_checks(targets, headers[targets.proxy.name]) if not args.skip_memory and own else None
    costs = await _cost_split(args, targets, headers, spread) if args.cost_split else None
    return {"levels": levels, "memory": memory, "cost_split": costs}


async def _cost_split(
    args: argparse.Namespace, targets: Targets, headers: dict[str, dict[str, str]], spread: LoadProcesses | None
) -> dict[str, Any]:
    """Each proxy's CPU per request and per relayed chunk, apart: the same load at the top concurrency with
    streams of two lengths, and cpu = requests × per_request + chunks × per_chunk solved for the two."""
    concurrency = max(args.concurrency)
    lengths = (args.tokens, args.tokens * 8)
    split: dict[str, Any] = {}
    async with new_session(concurrency) as session:
        phase = _phases(spread, session)
        for proxy in targets.proxies:
            url = proxy.url + "/v1/chat/completions"
            phases = []
            for tokens in lengths:
                body = chat_body(
                    tokens,
                    model=targets.model,
                    mock=args.engine in _OWN_ENGINES,
                    history=args.history_bytes,
                    extra=args.request_extra,
                )
                await phase("warm-up", url, headers[proxy.name], body, concurrency, 1)
                with ProcessMeter(proxy.pid, targets.engine_pid) as meter:
                    result = await phase(proxy.name, url, headers[proxy.name], body, concurrency, args.seconds)
                measured = {"cpu_s": meter.cpu_s, "requests": result.requests, "chunks": result.chunks}
                phases.append({"tokens": tokens} | measured)
            (c1, r1, k1), (c2, r2, k2) = ((ph["cpu_s"], ph["requests"], ph["chunks"]) for ph in phases)
            determinant = r1 * k2 - r2 * k1
            per_chunk = (r1 * c2 - r2 * c1) / determinant if determinant else None
            per_request = (c1 - k1 * per_chunk) / r1 if per_chunk is not None and r1 else None
            split[proxy.name] = {
                "concurrency": concurrency,
                "cpu_ms_per_request": None if per_request is None else round(per_request * 1000, 4),
                "cpu_us_per_chunk": None if per_chunk is None else round(per_chunk * 1e6, 2),
                "phases": phases,
            }
    return split


def _headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}


async def _memory_checks(targets: Targets, headers: dict[str, str]) -> dict[str, Any]:
    """A 4,000-token stream and ten 2 MB prompts through the proxy: its RSS before, at peak, and after."""
    checks: dict[str, Any] = {}
    url = targets.proxy.url + "/v1/chat/completions"
    long_body = json.dumps(
        {
            "model": "mock-model",
            "stream": True,
            "messages": [{"role": "user", "content": "a long answer"}],
            "mock": {"tokens": 4000, "itl_ms": 1, "ttft_ms": 1},
        }
    ).encode()
    big_prompt = "clock " * (2 * 2**20 // 6)
    big_body = json.dumps(
        {"model": "mock-model", "stream": True, "max_tokens": 8, "messages": [{"role": "user", "content": big_prompt}]}
    ).encode()
    async with new_session(1) as session:
        for name, body, repeat in (("long_stream_4000_tokens", long_body, 1), ("prompt_2mb_x10", big_body, 10)):
            result = PhaseResult(name, 1)
            before = psutil.Process(targets.proxy.pid).memory_info().rss / 2**20 if targets.proxy.pid else None
            with ProcessMeter(targets.proxy.pid, targets.engine_pid) as meter:
                for _ in range(repeat):
                    await stream_once(session, url, body, headers, result)
            after = psutil.Process(targets.proxy.pid).memory_info().rss / 2**20 if targets.proxy.pid else None
            checks[name] = {
                "errors": result.errors,
                "first_error": result.first_error,
                "chunks": result.chunks,
                "rss_before_mb": None if before is None else round(before, 1),
                "rss_peak_mb": round(meter.peak_rss_mb, 1) if targets.proxy.pid else None,
                "rss_after_mb": None if after is None else round(after, 1),
            }
    return checks


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    levels = "1,32,256,1024"
    parser.add_argument("--concurrency", default=levels, help=f"comma-separated levels (default {levels})")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each measured phase (default 4)")
    parser.add_argument("--rounds", type=int, default=3, help="direct/proxied alternations per level (default 3)")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per answer (default 32)")
    parser.add_argument(
        "--history-bytes", type=int, default=0, help="a chat history of about this many bytes before each prompt"
    )
    parser.add_argument("--itl-ms", type=float, default=5.0, help="fake engine's time between tokens (default 5)")
    parser.add_argument("--ttft-ms", type=float, default=20.0, help="fake engine's time to first token (default 20)")
    parser.add_argument(
        "--engine",
        default="fast",
        help="fast (default: bench/fast_engine.py, cheap enough per event to load the proxy), mock (the project's "
        "mock engine, slower than the sidecar from a few hundred streams), or a real engine the sidecar loads "
        "(llamacpp or vllm, with --model)",
    )
    parser.add_argument("--engine-workers", type=int, default=1, help="processes of the fast engine (default 1)")
    parser.add_argument(
        "--load-processes",
        type=int,
        default=1,
        help="processes of the load generator, the streams shared out between them (default 1: one loop reads "
        "some 100k chunks/s, less than several sidecar workers relay)",
    )
    parser.add_argument("--model", help="the model the engine loads (a .gguf file for llamacpp)")
    parser.add_argument("--engine-args", default="{}", help="the engine's flags as a JSON object, as in a load")
    parser.add_argument("--engine-executable", help="the engine's binary, where it is not on PATH")
    parser.add_argument(
        "--request-extra",
        type=json.loads,
        default={},
        help="fields added to every request, as a JSON object (vLLM with a random model: '{\"ignore_eos\": true}')",
    )
    parser.add_argument("--startup-timeout", type=float, default=120, help="seconds for the engine to be ready")
    add_target_options(parser)
    parser.add_argument(
        "--proxy-cpus",
        type=lambda text: {int(cpu) for cpu in text.split(",")},
        help="pin each proxy to these CPUs (comma list), the engine and the load generator to the others",
    )
    parser.add_argument("--target", help="measure this OpenAI-compatible proxy instead of the sidecar")
    parser.add_argument("--target-pid", type=int, help="the --target proxy's pid, for its CPU and memory")
    parser.add_argument("--engine-port", type=int, help="port for the fake engine with --target (default: free)")
    parser.add_argument("--skip-memory", action="store_true", help="skip the long-stream and large-prompt checks")
    parser.add_argument(
        "--otel", action="store_true", help="also measure a sidecar with OpenTelemetry on (to an OTLP sink) beside it"
    )
    parser.add_argument(
        "--cost-split",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="split each proxy's CPU into per request and per chunk (streams of --tokens and 8x as long; default on)",
    )
    parser.add_argument(
        "--workers",
        type=lambda text: [int(count) for count in text.split(",")],
        help="measure the sidecar with each of these SIDECAR_WORKERS counts (comma list, e.g. 1,2) and compare",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("bench/results"), help="where results go (default bench/results)"
    )
    return parser


def _measured(args: argparse.Namespace, targets: Targets) -> dict[str, Any]:
    return uvloop.run(_measure(args, targets))


def _scaling(args: argparse.Namespace, logs: Path) -> int:
    """One sidecar per worker count, the same load on each: chunks/s at the top concurrency, against one worker."""
    runs = []
    base_env = list(args.sidecar_env)
    for count in args.workers:
        args.sidecar_env = [*base_env, f"SIDECAR_WORKERS={count}"]
        with running(args, logs) as targets:
            measured = _measured(args, targets)
        runs.append({"workers": count, **measured})
    args.sidecar_env = base_env
    top, low = max(args.concurrency), min(args.concurrency)
    rows = []
    for run in runs:
        at_top = next(level for level in run["levels"] if level["concurrency"] == top)
        at_low = next(level for level in run["levels"] if level["concurrency"] == low)
        rows.append(
            {
                "workers": run["workers"],
                "chunks_per_s": at_top["proxied_chunks_per_s"],
                "direct_chunks_per_s": at_top["direct_chunks_per_s"],
                "nginx_chunks_per_s": (at_top.get("nginx") or {}).get("proxied_chunks_per_s"),
                "errors": at_top["errors"],
                "cpu_s_per_1k_chunks": at_top["proxy_cpu_s_per_1k_chunks"],
                f"added_ttft_p50_ms_at_{low}": at_low["added_ttft_p50_ms"],
                # Cores of this sidecar the direct rate would take, per worker: 2 or more, the engine and the load
                # generator streamed twice what these workers could relay, so the row measures the sidecar.
                "direct_in_worker_cores": _per(at_top["core_share_at_direct_rate"], run["workers"]),
            }
        )
    first = rows[0]["chunks_per_s"] or None
    for row in rows:
        row["vs_first"] = round(row["chunks_per_s"] / first, 3) if first else None
    results = {
        "machine": machine.describe(idle=False),
        "settings": {k: v for k, v in vars(args).items() if k not in {"out"}},
        "concurrency": top,
        "scaling": rows,
        "runs": runs,
    }
    (args.out / "scaling.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    names = list(rows[0])
    sys.stdout.write(f"relayed chunks/s at {top} streams by SIDECAR_WORKERS (direct and nginx: the same run)\n")
    sys.stdout.write(" | ".join(names) + "\n")
    for row in rows:
        sys.stdout.write(" | ".join(str(row[name]) for name in names) + "\n")
    sys.stdout.write(f"\nresults: {args.out / 'scaling.json'}, logs: {logs}\n")
    return 0


def _per(value: float | None, count: int) -> float | None:
    return None if value is None else round(value / count, 2)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.concurrency = [int(level) for level in args.concurrency.split(",")]
    _raise_fd_limit()
    args.out.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="sidecar-bench-"))
    if args.workers:
        return _scaling(args, logs)
    with running(args, logs) as targets:
        measured = _measured(args, targets)
    results = {
        "machine": machine.describe(idle=1 in args.concurrency),
        "settings": {k: v for k, v in vars(args).items() if k not in {"out"}},
        "proxy": targets.proxy.name,
        "sidecar_workers": targets.sidecar_workers,
        "compared": [proxy.name for proxy in targets.compared],
        "skipped": targets.skipped,
        "reference": targets.reference.name if targets.reference else None,
        "engine": args.engine if not args.target else "mock",
        **measured,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    write_chart(results, args.out / "results.png")
    write_table(results, sys.stdout)
    sys.stdout.write(f"\nresults: {args.out / 'results.json'}, chart: {args.out / 'results.png'}, logs: {logs}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
