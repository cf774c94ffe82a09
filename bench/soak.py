"""`python -m bench.soak`: the sidecar under sustained streaming load while its engine is killed and brought back.

`--streams` clients stream chat completions back to back through a sidecar with the mock engine loaded; about
a third of them leave in the middle of their stream. Meanwhile the engine is killed with SIGKILL every
`--crash-every` seconds (the restart policy brings it back) and, half-way, unloaded and loaded again under
load. A calm phase follows, without chaos, in which every client that leaves must show in the engine's own
count of cancelled requests. Every answer is classified: complete, an error the client was told of (a status,
or an error event before `[DONE]`), a client that left, or a silent cut (a stream that ended without
`[DONE]`), which must never happen. The sidecar's open file descriptors and RSS are read before and after,
with its connection pool idle both times. Prints the figures as JSON; exit code 1 if a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import psutil
import uvloop

from bench.processes import mock_engines, spawn_sidecar, wait_ok

KEY = "soak-key-0123"
HEADERS = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
TOKENS = 64
LONG_TOKENS = 2000
POOL_IDLE_S = 5.0  # longer than the sidecar's pooled connections live idle (4 s)


def _body(stream_id: int, long: bool) -> bytes:
    body: dict[str, Any] = {
        "model": "mock-model",
        "stream": True,
        "messages": [{"role": "user", "content": f"soak {stream_id}"}],
    }
    if long:  # a client that will leave asks for a 10 s answer: it leaves while the engine is surely generating
        body["mock"] = {"tokens": LONG_TOKENS}
    return json.dumps(body).encode()


async def _one(session: aiohttp.ClientSession, url: str, rng: random.Random, outcomes: Counter[str]) -> None:
    """One request; a leaving client closes its connection `leave_after` chunks into a long answer."""
    leave_after = rng.randint(1, TOKENS) if rng.random() < 0.33 else None
    body = _body(rng.randrange(10**6), long=leave_after is not None)
    try:
        async with session.post(url, data=body, headers=HEADERS) as response:
            if response.status != 200:
                await response.read()
                outcomes[f"status_{response.status}"] += 1
                if response.status == 503:
                    await asyncio.sleep(0.25)  # the engine is restarting: as a client would, wait a little
                return
            chunks = 0
            tail = b""
            async for data in response.content.iter_any():
                chunks += data.count(b"data: ")
                tail = (tail + data)[-4096:]
                if leave_after is not None and chunks >= leave_after:
                    response.close()  # drops the connection, as a client that goes away does
                    outcomes["client_left"] += 1
                    return
            if not tail.endswith(b"data: [DONE]\n\n"):
                outcomes["silent_cut"] += 1
            elif b'"error"' in tail:
                outcomes["error_event"] += 1
            else:
                outcomes["complete"] += 1
    except aiohttp.ClientError as exc:
        outcomes[f"silent_cut_{exc.__class__.__name__}"] += 1


async def _clients(url: str, streams: int, seconds: float, seed: int) -> Counter[str]:
    outcomes: Counter[str] = Counter()
    deadline = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=3)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def client(n: int) -> None:
            rng = random.Random(seed * 10_000 + n)
            while time.monotonic() < deadline:
                await _one(session, url + "/v1/chat/completions", rng, outcomes)

        await asyncio.gather(*(client(n) for n in range(streams)))
    return outcomes


def _status(base: str) -> dict[str, Any]:
    status: dict[str, Any] = httpx.get(f"{base}/v1/model", headers=HEADERS, timeout=10).json()
    return status


def _engine_stats(status: dict[str, Any]) -> dict[str, int]:
    stats: dict[str, int] = httpx.get(f"http://127.0.0.1:{status['port']}/mock/stats", timeout=10).json()
    return stats


async def _chaos(base: str, seconds: float, crash_every_s: float, events: Counter[str]) -> None:
    """SIGKILL to the engine every `crash_every_s`; half-way, an unload and a load under load."""
    started = time.monotonic()
    cycled = False
    while (elapsed := time.monotonic() - started) < seconds - crash_every_s:
        await asyncio.sleep(crash_every_s)
        if not cycled and elapsed >= seconds / 2:
            async with httpx.AsyncClient(base_url=base, headers=HEADERS, timeout=60) as client:
                unloaded = await client.post("/v1/model/unload", json={"drain_timeout_s": 1})
                loaded = await client.post("/v1/model/load", json={"engine": "mock", "model": "mock-model"})
            events["unload_load_cycles"] += unloaded.status_code == 200 and loaded.status_code == 200
            cycled = True
            continue
        status = await asyncio.to_thread(_status, base)
        if status["state"] == "ready" and status["pid"]:
            os.kill(status["pid"], signal.SIGKILL)
            events["engine_kills"] += 1


def _wait_ready(base: str, timeout_s: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while (status := _status(base))["state"] != "ready":
        if time.monotonic() > deadline:
            raise TimeoutError(f"the engine did not come back: {status}")
        time.sleep(0.1)
    return status


def _resources(pid: int) -> dict[str, float]:
    process = psutil.Process(pid)
    return {"fds": process.num_fds(), "rss_mb": round(process.memory_info().rss / 2**20, 1)}


async def soak(base: str, sidecar_pid: int, args: argparse.Namespace) -> dict[str, Any]:
    await _clients(base, args.streams, 2.0, seed=0)  # warm-up: connections, caches, the allocator's high water
    await asyncio.sleep(POOL_IDLE_S)
    before = _resources(sidecar_pid)
    chaos_s = args.seconds * 0.75
    events: Counter[str] = Counter()
    started = time.monotonic()
    chaos_outcomes, _ = await asyncio.gather(
        _clients(base, args.streams, chaos_s, args.seed), _chaos(base, chaos_s, args.crash_every, events)
    )
    status = await asyncio.to_thread(_wait_ready, base)
    calm_before = await asyncio.to_thread(_engine_stats, status)
    calm_outcomes = await _clients(base, args.streams, args.seconds - chaos_s, args.seed + 1)
    await asyncio.sleep(0.5)  # the engine notices the last disconnects
    calm_after = await asyncio.to_thread(_engine_stats, status)
    elapsed = time.monotonic() - started
    await asyncio.sleep(POOL_IDLE_S)
    after = _resources(sidecar_pid)
    final = await asyncio.to_thread(_status, base)
    engines = [engine.pid for engine in mock_engines(sidecar_pid)]
    outcomes = chaos_outcomes + calm_outcomes
    cuts = sum(count for name, count in outcomes.items() if name.startswith("silent_cut"))
    calm_cancelled = calm_after["cancelled"] - calm_before["cancelled"]
    checks = {
        "no_silent_cut": cuts == 0,
        "engine_killed_and_restarted": events["engine_kills"] >= 2 and final["restarts"] >= 1,
        "unload_load_cycle_under_load": events["unload_load_cycles"] == 1,
        "one_engine_left_the_current_one": engines == [final["pid"]] and final["state"] == "ready",
        "every_calm_disconnect_cancelled_in_the_engine": calm_cancelled == calm_outcomes["client_left"],
        "engine_idle_after": calm_after["in_flight"] == 0,
        "fds_back_within_16": after["fds"] - before["fds"] <= 16,
        "rss_back_within_20_percent": after["rss_mb"] <= before["rss_mb"] * 1.2,
    }
    return {
        "settings": {"streams": args.streams, "seconds": args.seconds, "crash_every_s": args.crash_every},
        "elapsed_s": round(elapsed, 1),
        "requests": sum(outcomes.values()),
        "outcomes": dict(sorted(outcomes.items())),
        "calm_phase": {"client_left": calm_outcomes["client_left"], "engine_cancelled": calm_cancelled},
        "engine_kills": events["engine_kills"],
        "restarts": final["restarts"],
        "unload_load_cycles": events["unload_load_cycles"],
        "sidecar_before": before,
        "sidecar_after": after,
        "checks": checks,
        "passed": all(checks.values()),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="sidecar-soak-"))
    settings = {
        "SIDECAR_API_KEYS": KEY,
        "SIDECAR_AUTOLOAD_ENGINE": "mock",
        "SIDECAR_AUTOLOAD_MODEL": "mock-model",
        "SIDECAR_AUTOLOAD_ARGS": json.dumps({"ttft-ms": 20, "itl-ms": 5, "tokens": TOKENS}),
        "SIDECAR_RESTART_MAX": "1000",
        "SIDECAR_RESTART_BACKOFF_S": "0.1",
        "SIDECAR_RESTART_BACKOFF_MAX_S": "0.2",
        "SIDECAR_DRAIN_TIMEOUT_S": "1",
        "SIDECAR_KILL_GRACE_S": "1",
        "SIDECAR_LOG_LEVEL": "warning",  # the access lines of tens of thousands of requests are not the point
    }
    sidecar, base = spawn_sidecar(settings, workdir)
    try:
        wait_ok(base + "/ready")
        return uvloop.run(soak(base, sidecar.pid, args))
    finally:
        sidecar.terminate()
        sidecar.wait(timeout=60)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=256, help="concurrent clients (default 256)")
    parser.add_argument("--seconds", type=float, default=120.0, help="length of the soak (default 120)")
    parser.add_argument("--crash-every", type=float, default=5.0, help="seconds between engine kills (default 5)")
    parser.add_argument("--seed", type=int, default=1)
    return parser


def main(argv: list[str] | None = None) -> int:
    result = run(parser().parse_args(argv))
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
