"""`python -m bench.instructions`: the instructions a proxy's own process executes for one streamed chat request,
counted by valgrind's callgrind, for the sidecar and, in the same run, for the floors it is compared with:
uvicorn with the sidecar's engine client and no feature (`bench/floors/bare_uvicorn.py`), and bytes piped on
uvloop (`bench/floors/pipe.py`).

Timings at one stream move with the machine by more than a change to the request's path does (docs/benchmarks.md);
a count of instructions does not: the same code gives the same count to 1%, whatever else the machine runs. So it
is the figure to compare a change's path length with, before and after (user space only: the kernel's part, the
same for every proxy, is not counted). Each proxy runs under callgrind with instrumentation off; `--warm` requests
go first (imports, caches, the engine's connection), then the count covers `--requests` requests, one at a time,
each read to its end by a client in this process on one keep-alive connection, as the OpenAI SDKs and the bench's
load send them (`--new-connections`: a connection for each request, its opening and closing counted too). The
fast engine (its own process, not counted) answers each with `--tokens` tokens `--pace-ms` apart, so that each
token is a read of its own (unpaced, how many tokens one read brings depends on the moment, and the count with it:
2.3 to 2.6 million a request for the same sidecar, where paced it repeats within 1%).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import httpx

from bench.loadgen import chat_body
from bench.processes import wait_ok
from sidecar.control.engine import free_port

KEY = "bench-instructions"
_FLOORS = Path(__file__).resolve().parent / "floors"


@contextmanager
def fast_engine(workdir: Path, tokens: int, pace_ms: float) -> Iterator[str]:
    """The bench's fast engine, answering `tokens` tokens `pace_ms` apart (0: unpaced), its URL while the block
    runs."""
    port = free_port()
    argv = [sys.executable, "-m", "bench.fast_engine", "--port", str(port), "--tokens", str(tokens)]
    argv += ["--ttft-ms", str(pace_ms), "--itl-ms", str(pace_ms)]
    with (workdir / "engine.log").open("wb") as log:
        engine = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ok(url + "/health")
        yield url
    finally:
        engine.terminate()
        engine.wait(timeout=30)


def _stream(connection: http.client.HTTPConnection, body: bytes, key: str | None) -> int:
    """One streamed chat request read to its end; the bytes of its answer."""
    headers = {"content-type": "application/json"} | ({"authorization": f"Bearer {key}"} if key else {})
    connection.request("POST", "/v1/chat/completions", body, headers)
    response = connection.getresponse()
    answer = response.read()
    if response.status != 200 or b"[DONE]" not in answer:
        raise RuntimeError(f"the proxy answered {response.status}: {answer[:300]!r}")
    return len(answer)


def requests(port: int, body: bytes, key: str | None, count: int, new_connections: bool) -> None:
    """`count` streamed requests one after another: on one keep-alive connection, or each on a new one."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        for _ in range(count):
            _stream(connection, body, key)
            if new_connections:
                connection.close()  # the next request opens a new one
    finally:
        connection.close()


def _control(pid: int, *command: str) -> None:
    subprocess.run(["callgrind_control", *command, str(pid)], check=True, capture_output=True, timeout=60)


@contextmanager
def spawned(argv: list[str], env: dict[str, str], workdir: Path, name: str) -> Iterator[int]:
    """A proxy's command started in the work folder, its output in `<name>.log`; its pid while the block runs, then
    it is stopped."""
    with (workdir / f"{name}.log").open("wb") as log:
        # Run from the work folder: a checkout's own folder first on sys.path would shadow `--sidecar-tree`.
        process = subprocess.Popen(argv, env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield process.pid
    finally:
        process.terminate()
        process.wait(timeout=60)


def _under_callgrind(argv: list[str], env: dict[str, str], workdir: Path, name: str) -> AbstractContextManager[int]:
    """The command run by callgrind with instrumentation off (`spawned`)."""
    out = workdir / f"{name}.callgrind.%p"
    command = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}", *argv]
    return spawned(command, env, workdir, name)


def _instructions(workdir: Path, name: str) -> int:
    """What callgrind counted for one proxy: the totals of every dump it wrote."""
    total = 0
    for path in workdir.glob(f"{name}.callgrind.*"):
        for line in path.read_text().splitlines():
            if line.startswith("totals:"):
                total += int(line.split()[1])
    return total


def add_count_options(parser: argparse.ArgumentParser, requests: int, warm: int) -> None:
    """The options of a count over requests (this one's and `bench.syscalls`'): how many, of what, of which sidecar
    (`proxy_command` reads the last two), and where the counts go."""
    parser.add_argument("--requests", type=int, default=requests, help=f"requests counted (default {requests})")
    parser.add_argument("--warm", type=int, default=warm, help=f"requests before the count (default {warm})")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per answer (default 32)")
    parser.add_argument("--sidecar-env", action="append", default=[], help="extra SIDECAR_X=value for the sidecar")
    parser.add_argument("--sidecar-tree", type=Path, help="count the sidecar of this checkout (a git worktree)")
    parser.add_argument("--out", type=Path, help="write the counts here as JSON")


def proxy_command(name: str, args: argparse.Namespace, port: int, engine_url: str) -> tuple[list[str], dict[str, str]]:
    """How one proxy (`sidecar`, `bare_uvicorn` or `pipe`) starts on `port` in front of the engine: its argv and
    environment. The sidecar in one process (no data-plane workers to miss), its watchdog's sampling thread idle;
    `args.sidecar_env` and `args.sidecar_tree` (another checkout's sidecar, for a before and after) applied."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    if name != "sidecar":
        return [sys.executable, str(_FLOORS / f"{name}.py"), str(port), engine_url.rsplit(":", 1)[1]], env
    env |= {"SIDECAR_API_KEYS": KEY, "SIDECAR_PORT": str(port), "SIDECAR_WORKERS": "1"}
    env |= {"SIDECAR_WATCHDOG_INTERVAL_MS": "3600000"}
    env |= dict(item.split("=", 1) for item in args.sidecar_env)
    if args.sidecar_tree:
        env["PYTHONPATH"] = str(args.sidecar_tree.resolve())
    return [sys.executable, "-m", "sidecar", "serve"], env


def wait_serving(name: str, port: int, engine_url: str) -> None:
    """Until a started proxy serves: the sidecar with the engine loaded (an external one), a floor listening."""
    if name != "sidecar":  # the engine was ready before any proxy started
        _wait_listening(port)
        return
    url = f"http://127.0.0.1:{port}"
    wait_ok(url + "/health", timeout_s=300)
    load = {"engine": "external", "model": "mock-model", "url": engine_url}
    headers = {"Authorization": f"Bearer {KEY}"}
    httpx.post(f"{url}/v1/model/load", json=load, headers=headers, timeout=300).raise_for_status()


def count(name: str, args: argparse.Namespace, engine_url: str, workdir: Path) -> int:
    """Instructions per request of one proxy (`sidecar`, `bare_uvicorn` or `pipe`) in front of the engine."""
    port = free_port()
    argv, env = proxy_command(name, args, port, engine_url)
    key = KEY if name == "sidecar" else None
    body = chat_body(args.tokens)
    with _under_callgrind(argv, env, workdir, name) as pid:
        wait_serving(name, port, engine_url)
        requests(port, body, key, args.warm, args.new_connections)
        _control(pid, "-i", "on")
        requests(port, body, key, args.requests, args.new_connections)
        _control(pid, "-i", "off")
    return _instructions(workdir, name) // int(args.requests)


def _wait_listening(port: int) -> None:
    """Until a floor accepts connections (they answer no health check of their own)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {port}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.split("\n\n")[0])
    add_count_options(parser, requests=100, warm=20)
    parser.add_argument(
        "--pace-ms", type=float, default=2.0, help="the engine's tokens this far apart, 0: unpaced (default 2)"
    )
    parser.add_argument(
        "--proxies", default="sidecar,bare_uvicorn,pipe", help="which to count (default sidecar,bare_uvicorn,pipe)"
    )
    parser.add_argument(
        "--new-connections", action="store_true", help="a connection for each request (default: one kept alive)"
    )
    args = parser.parse_args(argv)
    missing = [tool for tool in ("valgrind", "callgrind_control") if shutil.which(tool) is None]
    if missing:
        sys.stderr.write(f"needs {' and '.join(missing)} (Debian's valgrind package)\n")
        return 2
    counts: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="bench-instructions-") as tmp:
        workdir = Path(tmp)
        with fast_engine(workdir, args.tokens, args.pace_ms) as engine_url:
            for name in args.proxies.split(","):
                counts[name] = count(name, args, engine_url, workdir)
    connections = "a new connection each" if args.new_connections else "one connection kept alive"
    sys.stdout.write(
        f"instructions per streamed request of {args.tokens} tokens {args.pace_ms:g} ms apart "
        f"({args.requests} counted, {connections})\n"
    )
    for name, instructions in counts.items():
        sys.stdout.write(f"  {name}: {instructions:,}\n")
    if counts.get("sidecar"):
        floors = [f"{counts['sidecar'] / n:.2f}x {name}'s" for name, n in counts.items() if name != "sidecar" and n]
        sys.stdout.write(f"the sidecar: {', '.join(floors)}\n" if floors else "")
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "tokens": args.tokens,
                    "pace_ms": args.pace_ms,
                    "requests": args.requests,
                    "new_connections": args.new_connections,
                    "per_request": counts,
                }
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
