"""`python -m bench.embeddings`: what each proxy costs an embeddings answer, against a direct connection to the
engine, in one run.

An embedding model's answers are large and come whole: 64 inputs of 1,024 values are 1.4 MB of JSON as floats
(vLLM's default, which it writes from its arrays with orjson), 0.36 MB as base64 (what the OpenAI SDKs ask for).
The bench's fast engine answers each request at once with an answer it encoded once, so what a request costs is
the proxies'. Per concurrency, each target (direct, the sidecar, nginx, `--peers`) runs `--seconds` phases of
back-to-back requests, alternated over `--rounds`; per proxy it prints requests/s against direct, the latency it
adds (p50, p99) and its CPU per request, and the engine's CPU per request, which must be below the proxies' for
the figures to measure them. `--input-chars` makes each input a passage that long: a large request, as a retrieval
pipeline sends them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import uvloop

from bench import machine
from bench.__main__ import _parser as bench_parser
from bench.loadgen import back_to_back, new_session
from bench.processes import ProcessMeter
from bench.targets import Targets, add_target_options, running
from sidecar.telemetry.stats import percentile


@dataclass
class Phase:
    """One target's requests in one phase."""

    seconds: float = 0.0
    requests: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    first_error: str | None = None


def body(inputs: int, model: str, encoding: str, input_chars: int = 0) -> bytes:
    """An embeddings request of `inputs` texts: short ones, or each `input_chars` characters long (a document's
    passage, as a retrieval pipeline sends them)."""
    texts = [f"passage {index}: the proxy carries every embedding of it back" for index in range(inputs)]
    if input_chars:
        texts = [(text + " ") * (input_chars // (len(text) + 1) + 1) for text in texts]
        texts = [text[:input_chars] for text in texts]
    return json.dumps({"model": model, "input": texts, "encoding_format": encoding}).encode()


async def _request(
    session: aiohttp.ClientSession, url: str, payload: bytes, headers: dict[str, str], phase: Phase
) -> None:
    started = time.perf_counter()
    try:
        async with session.post(url, data=payload, headers=headers) as response:
            answer = await response.read()
            if response.status != 200 or not answer.endswith(b"}") or b'"usage"' not in answer:
                raise RuntimeError(f"status {response.status}: {answer[:200]!r}")
    except (aiohttp.ClientError, RuntimeError, TimeoutError) as exc:
        phase.errors += 1
        phase.first_error = phase.first_error or f"{exc.__class__.__name__}: {exc}"
        return
    phase.requests += 1
    phase.latencies_ms.append((time.perf_counter() - started) * 1000)


async def _phase(
    session: aiohttp.ClientSession, url: str, payload: bytes, headers: dict[str, str], concurrency: int, seconds: float
) -> Phase:
    phase = Phase()
    phase.seconds = await back_to_back(lambda: _request(session, url, payload, headers, phase), concurrency, seconds)
    return phase


def _q(values: list[float], level: float) -> float | None:
    return round(percentile(values, level), 3) if values else None


def _figures(phases: list[Phase], cpu_s: float, direct: dict[str, Any] | None) -> dict[str, Any]:
    """A target's figures over its phases at one level; a proxy's against direct's."""
    latencies = sorted(latency for phase in phases for latency in phase.latencies_ms)
    requests = sum(phase.requests for phase in phases)
    seconds = sum(phase.seconds for phase in phases)
    figures: dict[str, Any] = {
        "requests_per_s": round(requests / seconds, 1) if seconds else 0.0,
        "latency_p50_ms": _q(latencies, 50),
        "latency_p99_ms": _q(latencies, 99),
        "errors": sum(phase.errors for phase in phases),
        "first_error": next((phase.first_error for phase in phases if phase.first_error), None),
        "cpu_ms_per_request": round(cpu_s * 1000 / requests, 3) if requests else None,
    }
    if direct is not None:
        rate = direct["requests_per_s"]
        figures["throughput_ratio"] = round(figures["requests_per_s"] / rate, 3) if rate else None
        for level in ("p50", "p99"):
            own, base = figures[f"latency_{level}_ms"], direct[f"latency_{level}_ms"]
            figures[f"added_{level}_ms"] = None if own is None or base is None else round(own - base, 3)
    return figures


async def _measure(args: argparse.Namespace, targets: Targets, payload: bytes) -> list[dict[str, Any]]:
    """Each level: direct's figures (the engine's CPU a request among them) and each proxy's."""
    headers = {
        name: {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        for name, key in targets.keys.items()
    }
    urls = {"direct": targets.direct} | {proxy.name: proxy.url for proxy in targets.proxies}
    # Whose CPU each phase counts: the engine's on direct's (the engine check), else the proxy's.
    pids = {"direct": targets.engine_pid} | {proxy.name: proxy.pid for proxy in targets.proxies}
    levels = []
    for concurrency in args.concurrency:
        async with new_session(concurrency) as session:
            phases: dict[str, list[Phase]] = {name: [] for name in urls}
            cpu_s = dict.fromkeys(urls, 0.0)
            for name, url in urls.items():  # warm every path: connections, caches, the engine's encoded answer
                await _phase(session, url + "/v1/embeddings", payload, headers[name], concurrency, 1)
            for round_index in range(args.rounds):
                for name in list(urls) if round_index % 2 == 0 else list(reversed(urls)):
                    engine = None if name == "direct" else targets.engine_pid
                    with ProcessMeter(pids[name], engine) as meter:
                        url = urls[name] + "/v1/embeddings"
                        phases[name].append(
                            await _phase(session, url, payload, headers[name], concurrency, args.seconds)
                        )
                    cpu_s[name] += meter.cpu_s
            direct = _figures(phases["direct"], cpu_s["direct"], None)
            proxies = {name: _figures(phases[name], cpu_s[name], direct) for name in urls if name != "direct"}
            levels.append({"concurrency": concurrency, "direct": direct, "proxies": proxies})
            sys.stderr.write(f"concurrency {concurrency}: done\n")
    return levels


def _write_table(results: dict[str, Any], out: TextIO) -> None:
    out.write(
        f"\nembeddings of {results['inputs']} inputs x {results['dims']} values as {results['encoding']} "
        f"({results.get('request_bytes', '?')} bytes a request, {results['answer_bytes']} an answer) "
        "against a direct connection to the fast engine "
        f"({results['machine'].get('cpus')} CPUs)\n\n"
    )
    columns = ("direct req/s", "req/s ratio", "+latency p50 ms", "+latency p99 ms", "CPU ms/request", "errors")
    out.write(" | ".join(("conc", "proxy", *columns)) + "\n")
    out.write(" | ".join("-" * len(name) for name in ("conc", "proxy", *columns)) + "\n")
    for level in results["levels"]:
        direct, proxies = level["direct"], level["proxies"]
        for name, f in proxies.items():
            row = (f["throughput_ratio"], f["added_p50_ms"], f["added_p99_ms"], f["cpu_ms_per_request"], f["errors"])
            out.write(" | ".join(str(cell) for cell in (level["concurrency"], name, direct["requests_per_s"], *row)))
            out.write("\n")
        engine_cpu = direct["cpu_ms_per_request"]
        cheapest = min((f["cpu_ms_per_request"] or 0.0 for f in proxies.values()), default=0.0)
        verdict = (
            "below every proxy's: the figures measure the proxies"
            if engine_cpu is not None and engine_cpu < cheapest
            else "NOT below every proxy's: the engine bounds what is measured"
        )
        out.write(f"  the engine's CPU a request at {level['concurrency']}: {engine_cpu} ms, {verdict}\n")
        sidecar, nginx = proxies.get("sidecar"), proxies.get("nginx")
        if sidecar and nginx and sidecar["cpu_ms_per_request"] and nginx["cpu_ms_per_request"]:
            cpu = sidecar["cpu_ms_per_request"] / nginx["cpu_ms_per_request"]
            out.write(f"  sidecar against nginx: {cpu:.2f}x CPU a request\n")
        for name, f in {"direct": direct, **proxies}.items():
            if f["first_error"]:
                out.write(f"  {name}: first error: {f['first_error']}\n")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.embeddings", description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=64, help="inputs a request, an embedding each (default 64)")
    parser.add_argument(
        "--input-chars", type=int, default=0, help="characters in each input (default: a short sentence, 56)"
    )
    parser.add_argument("--dims", type=int, default=1024, help="values in an embedding (default 1024)")
    parser.add_argument(
        "--encoding", choices=("float", "base64"), default="float", help="encoding_format (default float)"
    )
    parser.add_argument("--concurrency", default="1,16", help="comma-separated levels (default 1,16)")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each measured phase (default 4)")
    parser.add_argument("--rounds", type=int, default=3, help="alternations per level (default 3)")
    add_target_options(parser)
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("bench/results/embeddings"),
        help="where results go (default bench/results/embeddings)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.concurrency = [int(level) for level in args.concurrency.split(",")]
    # The targets as `python -m bench` starts them, the fast engine answering embeddings of --dims values.
    start = bench_parser().parse_args(["--nginx", args.nginx])
    start.peers, start.sidecar_env, start.embedding_dims = args.peers, args.sidecar_env, args.dims
    args.out.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="sidecar-bench-embeddings-"))
    with running(start, logs) as targets:
        payload = body(args.inputs, targets.model, args.encoding, args.input_chars)
        levels = uvloop.run(_measure(args, targets, payload))
        answer_bytes = len(asyncio.run(_one_answer(targets, payload)))
    results = {
        "machine": machine.describe(idle=False),
        "inputs": args.inputs,
        "dims": args.dims,
        "encoding": args.encoding,
        "request_bytes": len(payload),
        "answer_bytes": answer_bytes,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "skipped": targets.skipped,
        "levels": levels,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    _write_table(results, sys.stdout)
    sys.stdout.write(f"\nresults: {args.out / 'results.json'}, logs: {logs}\n")
    return 0


async def _one_answer(targets: Targets, payload: bytes) -> bytes:
    """The engine's answer to the bench's request, for its size."""
    headers = {"Authorization": f"Bearer {targets.keys['direct']}", "Content-Type": "application/json"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(targets.direct + "/v1/embeddings", data=payload, headers=headers) as response,
    ):
        return await response.read()


if __name__ == "__main__":
    sys.exit(main())
