"""`python -m bench.syscalls`: the system calls a proxy's event-loop thread makes for one streamed chat request,
counted by strace, for the sidecar, nginx and the floors of `bench.instructions` (uvicorn with the sidecar's
engine client, and bytes piped on uvloop), in one run.

A count, not a time: each system call is a trip through the kernel that a relay pays for on every read it relays,
and one more a read is a cost no profile of Python code shows (asyncio's `get_running_loop()` is a `getpid()`
each time it is asked, which the relay once did at every read). The fast engine paces its tokens a millisecond
apart, so that each is a read of its own for every proxy (unpaced, how many tokens one read brings depends on the
moment). strace attaches to the proxy's main thread only (nginx: its worker process), after `--warm` requests, for
`--requests` more, one at a time on one keep-alive connection: the sidecar's other threads (the watchdog's
sampling, the log writers) are not counted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.instructions import KEY, add_count_options, fast_engine, proxy_command, requests, spawned, wait_serving
from bench.loadgen import chat_body
from bench.nginx import find_nginx, start_nginx, worker_pid
from sidecar.control.engine import free_port


@contextmanager
def _started(name: str, args: argparse.Namespace, engine_url: str, workdir: Path) -> Iterator[tuple[int, int]]:
    """One proxy, serving: the port it listens on and the pid whose main thread runs its event loop."""
    if name == "nginx":
        binary = find_nginx("auto")
        if binary is None:
            raise SystemExit("nginx is not installed (Debian's nginx-light): leave it out of --proxies")
        master, url = start_nginx(binary, int(engine_url.rsplit(":", 1)[1]), workdir)
        try:
            yield int(url.rsplit(":", 1)[1]), worker_pid(master)
        finally:
            master.terminate()
            master.wait(timeout=30)
        return
    port = free_port()
    with spawned(*proxy_command(name, args, port, engine_url), workdir, name) as pid:
        wait_serving(name, port, engine_url)
        yield port, pid


def parse_summary(text: str) -> dict[str, int]:
    """Calls by system call, from the table `strace -c` writes (its total left out)."""
    calls: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        # % time, seconds, usecs/call, calls, [errors], syscall
        if len(parts) >= 5 and parts[3].isdigit() and parts[-1] != "total":
            calls[parts[-1]] = int(parts[3])
    return calls


def count(name: str, args: argparse.Namespace, engine_url: str, workdir: Path) -> dict[str, float]:
    """System calls per request of one proxy's event-loop thread, by call, most first."""
    body = chat_body(args.tokens)
    key = KEY if name == "sidecar" else None  # nginx passes what it gets on to the engine, which asks for none
    summary = workdir / f"{name}.strace"
    with _started(name, args, engine_url, workdir) as (port, pid):
        requests(port, body, key, args.warm, new_connections=False)
        strace = subprocess.Popen(
            ["strace", "-c", "-o", str(summary), "-p", str(pid)], stderr=subprocess.PIPE, text=True
        )
        assert strace.stderr is not None
        attached = strace.stderr.readline()  # "strace: Process N attached": nothing before it is counted
        if "attached" not in attached:
            strace.kill()
            raise RuntimeError(f"strace could not attach to {name} ({pid}): {attached.strip()}")
        requests(port, body, key, args.requests, new_connections=False)
        strace.send_signal(signal.SIGINT)  # detaches and writes its table
        strace.communicate(timeout=60)
    calls = parse_summary(summary.read_text())
    per_request = {call: round(n / args.requests, 2) for call, n in calls.items()}
    return dict(sorted(per_request.items(), key=lambda item: -item[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.syscalls", description=__doc__.split("\n\n")[0])
    add_count_options(parser, requests=50, warm=10)
    parser.add_argument(
        "--proxies",
        default="sidecar,nginx,bare_uvicorn,pipe",
        help="which to count (default sidecar,nginx,bare_uvicorn,pipe)",
    )
    args = parser.parse_args(argv)
    if shutil.which("strace") is None:
        sys.stderr.write("needs strace (Debian's strace package)\n")
        return 2
    counts: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-syscalls-") as tmp:
        workdir = Path(tmp)
        with fast_engine(workdir, args.tokens, pace_ms=1) as engine_url:
            for name in args.proxies.split(","):
                counts[name] = count(name, args, engine_url, workdir)
    sys.stdout.write(
        f"system calls of the event loop's thread per streamed request of {args.tokens} tokens, each token a read "
        f"({args.requests} counted, one connection kept alive)\n"
    )
    for name, calls in counts.items():
        each = ", ".join(f"{call} {n:g}" for call, n in calls.items())
        sys.stdout.write(f"  {name}: {sum(calls.values()):g} ({each})\n")
    if args.out:
        args.out.write_text(json.dumps({"tokens": args.tokens, "requests": args.requests, "per_request": counts}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
