"""`python -m bench`: the sidecar's cost against a direct connection to the engine, measured in one run.

It starts the sidecar with the mock engine loaded, then drives streaming chat load at each concurrency
against the engine directly and through the sidecar, alternating, and reports ratios: TTFT added by the
sidecar, throughput (chunks per second) relative to direct, errors, and the sidecar's CPU and memory.
`--target URL` measures another OpenAI-compatible proxy the same way, in front of a mock engine the bench
starts on `--engine-port` (point the proxy there first).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import uvloop
from tqdm import tqdm

from bench.loadgen import PhaseResult, chat_body, new_session, run_phase, stream_once
from bench.processes import spawn_sidecar, wait_ok
from bench.report import summarize, write_chart, write_table
from sidecar.supervisor import free_port

KEY = "bench-key-0123"


@dataclass
class Targets:
    direct: str  # the engine's base URL
    proxied: str  # the sidecar's (or --target's) base URL
    proxy_name: str
    proxy_pid: int | None  # whose CPU and memory are measured


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@contextmanager
def _processes(args: argparse.Namespace, logs: Path) -> Iterator[Targets]:
    engine_args = {"ttft-ms": args.ttft_ms, "itl-ms": args.itl_ms, "tokens": args.tokens}
    started: list[subprocess.Popen[bytes]] = []
    try:
        if args.target:
            port = args.engine_port or free_port()
            argv = [sys.executable, "-m", "engines.mock_server", "--port", str(port)]
            for name, value in engine_args.items():
                argv += [f"--{name}", str(value)]
            started.append(subprocess.Popen(argv, stdout=(logs / "engine.log").open("wb"), stderr=subprocess.STDOUT))
            direct = f"http://127.0.0.1:{port}"
            wait_ok(direct + "/health")
            yield Targets(direct, args.target.rstrip("/"), "target", args.target_pid)
            return
        settings = {
            "SIDECAR_API_KEYS": KEY,
            "SIDECAR_AUTOLOAD_ENGINE": "mock",
            "SIDECAR_AUTOLOAD_MODEL": "mock-model",
            "SIDECAR_AUTOLOAD_ARGS": json.dumps(engine_args),
        }
        settings |= dict(item.split("=", 1) for item in args.sidecar_env)
        sidecar, url = spawn_sidecar(settings, logs)
        started.append(sidecar)
        wait_ok(url + "/ready")
        engine_port = httpx.get(f"{url}/v1/model", headers={"Authorization": f"Bearer {KEY}"}).json()["port"]
        yield Targets(f"http://127.0.0.1:{engine_port}", url, "sidecar", sidecar.pid)
    finally:
        for process in reversed(started):
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


class ProcessMeter:
    """CPU seconds and peak RSS of one process over a phase (RSS sampled every 50 ms)."""

    def __init__(self, pid: int | None) -> None:
        self.process = psutil.Process(pid) if pid else None
        self.cpu_s = 0.0
        self.peak_rss_mb = 0.0
        self._task: asyncio.Task[None] | None = None
        self._cpu_start = 0.0

    def _cpu(self) -> float:
        assert self.process is not None
        times = self.process.cpu_times()
        return float(times.user + times.system)

    async def _sample(self) -> None:
        assert self.process is not None
        while True:
            self.peak_rss_mb = max(self.peak_rss_mb, self.process.memory_info().rss / 2**20)
            await asyncio.sleep(0.05)

    def __enter__(self) -> ProcessMeter:
        if self.process is not None:
            self._cpu_start = self._cpu()
            self._task = asyncio.get_running_loop().create_task(self._sample())
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process is not None and self._task is not None:
            self._task.cancel()
            self.cpu_s = self._cpu() - self._cpu_start


async def _measure(args: argparse.Namespace, targets: Targets) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    body = chat_body(args.tokens)
    levels: list[dict[str, Any]] = []
    phases = len(args.concurrency) * args.rounds * 2
    with tqdm(total=phases, desc="phases", unit="phase", file=sys.stderr) as progress:
        for concurrency in args.concurrency:
            async with new_session(concurrency) as session:
                runs: dict[str, list[PhaseResult]] = {"direct": [], targets.proxy_name: []}
                cpu_s = 0.0
                peak_rss = 0.0
                for url in (targets.direct, targets.proxied):  # warm both: connections, caches, the engine
                    await run_phase(session, "warm-up", url + "/v1/chat/completions", headers, body, concurrency, 1)
                for round_index in range(args.rounds):
                    order = ["direct", targets.proxy_name]
                    for name in order if round_index % 2 == 0 else reversed(order):
                        url = (targets.direct if name == "direct" else targets.proxied) + "/v1/chat/completions"
                        progress.set_postfix_str(f"c={concurrency} {name}")
                        with ProcessMeter(targets.proxy_pid if name != "direct" else None) as meter:
                            result = await run_phase(session, name, url, headers, body, concurrency, args.seconds)
                        if name != "direct":
                            cpu_s += meter.cpu_s
                            peak_rss = max(peak_rss, meter.peak_rss_mb)
                        runs[name].append(result)
                        progress.update()
                levels.append(summarize(concurrency, runs["direct"], runs[targets.proxy_name], cpu_s, peak_rss))
    memory = await _memory_checks(targets, headers) if not args.skip_memory else None
    return {"levels": levels, "memory": memory}


async def _memory_checks(targets: Targets, headers: dict[str, str]) -> dict[str, Any]:
    """A 4,000-token stream and ten 2 MB prompts through the proxy: its RSS before, at peak, and after."""
    checks: dict[str, Any] = {}
    url = targets.proxied + "/v1/chat/completions"
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
            before = psutil.Process(targets.proxy_pid).memory_info().rss / 2**20 if targets.proxy_pid else None
            with ProcessMeter(targets.proxy_pid) as meter:
                for _ in range(repeat):
                    await stream_once(session, url, body, headers, result)
            after = psutil.Process(targets.proxy_pid).memory_info().rss / 2**20 if targets.proxy_pid else None
            checks[name] = {
                "errors": result.errors,
                "first_error": result.first_error,
                "chunks": result.chunks,
                "rss_before_mb": None if before is None else round(before, 1),
                "rss_peak_mb": round(meter.peak_rss_mb, 1) if targets.proxy_pid else None,
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
    parser.add_argument("--itl-ms", type=float, default=5.0, help="mock engine's time between tokens (default 5)")
    parser.add_argument("--ttft-ms", type=float, default=20.0, help="mock engine's time to first token (default 20)")
    parser.add_argument("--target", help="measure this OpenAI-compatible proxy instead of the sidecar")
    parser.add_argument("--target-pid", type=int, help="the --target proxy's pid, for its CPU and memory")
    parser.add_argument("--engine-port", type=int, help="port for the mock engine with --target (default: free)")
    parser.add_argument("--sidecar-env", action="append", default=[], help="extra SIDECAR_X=value for the sidecar")
    parser.add_argument("--skip-memory", action="store_true", help="skip the long-stream and large-prompt checks")
    parser.add_argument(
        "--out", type=Path, default=Path("bench/results"), help="where results go (default bench/results)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.concurrency = [int(level) for level in args.concurrency.split(",")]
    _raise_fd_limit()
    args.out.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="sidecar-bench-"))
    with _processes(args, logs) as targets:
        measured = uvloop.run(_measure(args, targets))
    results = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(),
        },
        "settings": {k: v for k, v in vars(args).items() if k not in {"out"}},
        "proxy": targets.proxy_name,
        **measured,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    write_chart(results, args.out / "results.png")
    write_table(results, sys.stdout)
    sys.stdout.write(f"\nresults: {args.out / 'results.json'}, chart: {args.out / 'results.png'}, logs: {logs}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
