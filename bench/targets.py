"""What a bench run measures, started for it and stopped after: the engine (the bench's own, or one the sidecar
loads), the sidecar or `--target`, a sidecar with OpenTelemetry on, the peers, and nginx."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

import engines
from bench import peers
from bench.nginx import find_nginx, start_nginx, worker_pid
from bench.processes import engine_key, pin, spawn_sidecar, wait_ok
from sidecar.control.engine import free_port

KEY = "sk-bench-key-0123"  # LiteLLM's proxy takes it as its master key too


@dataclass
class Proxy:
    name: str
    url: str
    pid: int | None  # whose CPU and memory are measured
    key: str = KEY  # what the load's clients send it: the bench's key, or the engine's to one that checks none


@dataclass
class Targets:
    direct: str  # the engine's base URL
    proxy: Proxy  # the sidecar (or --target)
    reference: Proxy | None  # nginx, where it is installed
    engine_pid: int | None = None
    model: str = "mock-model"
    engine_key: str | None = None  # the key the sidecar gave an engine it started, which its /v1 paths need
    sidecar_workers: int | None = None  # the data-plane processes the sidecar runs (its default: from its cores)
    # Beside the sidecar: the same with OpenTelemetry on, the peers; and the peers skipped, with why.
    compared: list[Proxy] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def proxies(self) -> list[Proxy]:
        return [self.proxy, *self.compared] + ([self.reference] if self.reference else [])

    @property
    def keys(self) -> dict[str, str]:
        """What the load's clients send each target: the engine's key to the engine and to a proxy that passes on
        the client's, the bench's to one with keys of its own."""
        return {"direct": self.engine_key or KEY} | {proxy.name: proxy.key for proxy in self.proxies}


def _peer_names(text: str) -> list[str]:
    names = [name for name in text.split(",") if name]
    unknown = set(names) - set(peers.PEERS)
    if unknown:
        raise argparse.ArgumentTypeError(
            f"no peer named {', '.join(sorted(unknown))} (there are {', '.join(peers.PEERS)})"
        )
    return names


def add_target_options(parser: argparse.ArgumentParser) -> None:
    """The options of what a run puts beside the sidecar, and of the sidecar itself."""
    parser.add_argument("--nginx", default="auto", help="nginx binary to measure beside the sidecar (auto|off|PATH)")
    parser.add_argument(
        "--peers",
        type=_peer_names,
        default=[],
        help=f"proxies to measure beside the sidecar, installed on demand (comma list of {', '.join(peers.PEERS)})",
    )
    parser.add_argument("--sidecar-env", action="append", default=[], help="extra SIDECAR_X=value for the sidecar")


def _sidecar_settings(args: argparse.Namespace) -> dict[str, str]:
    extra = dict(item.split("=", 1) for item in args.sidecar_env)
    if args.engine == "fast":  # started by the bench, loaded as an external engine
        return {"SIDECAR_API_KEYS": KEY} | extra
    settings = {"SIDECAR_API_KEYS": KEY, "SIDECAR_AUTOLOAD_ENGINE": args.engine}
    if args.engine == "mock":
        engine_args: dict[str, Any] = {"ttft-ms": args.ttft_ms, "itl-ms": args.itl_ms, "tokens": args.tokens}
        settings["SIDECAR_AUTOLOAD_MODEL"] = "mock-model"
    else:
        if not args.model:
            raise SystemExit(f"--engine {args.engine} needs --model")
        engine_args = {}
        settings["SIDECAR_AUTOLOAD_MODEL"] = args.model
        settings["SIDECAR_AUTOLOAD_SERVED_MODEL_NAME"] = "bench-model"
    settings["SIDECAR_AUTOLOAD_ARGS"] = json.dumps(engine_args | json.loads(args.engine_args))
    if args.engine_executable:
        settings["SIDECAR_ENGINE_EXECUTABLES"] = json.dumps({args.engine: args.engine_executable})
    return settings | extra


def _own_engine(args: argparse.Namespace, logs: Path, module: str) -> tuple[subprocess.Popen[bytes], str]:
    """The mock engine (for --target) or the fast one, started by the bench itself."""
    port = args.engine_port or free_port()
    argv = [sys.executable, "-m", module, "--port", str(port)]
    for name, value in {"ttft-ms": args.ttft_ms, "itl-ms": args.itl_ms, "tokens": args.tokens}.items():
        argv += [f"--{name}", str(value)]
    if module == "bench.fast_engine":
        argv += ["--workers", str(args.engine_workers)]
        if getattr(args, "embedding_dims", None):  # `python -m bench.embeddings`
            argv += ["--embedding-dims", str(args.embedding_dims)]
    with (logs / "engine.log").open("wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    direct = f"http://127.0.0.1:{port}"
    wait_ok(direct + "/health")
    return process, direct


@contextmanager
def running(args: argparse.Namespace, logs: Path) -> Iterator[Targets]:
    """Every target of the run, started; all stopped, last started first, when the run is over."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        if args.target:
            engine, direct = _own_engine(
                args, logs, "bench.fast_engine" if args.engine == "fast" else "engines.mock_server"
            )
            started.append(engine)
            targets = Targets(direct, Proxy("target", args.target.rstrip("/"), args.target_pid), None, engine.pid)
        elif args.engine == "fast":
            engine, direct = _own_engine(args, logs, "bench.fast_engine")
            started.append(engine)
            sidecar, url = spawn_sidecar(_sidecar_settings(args), logs)
            started.append(sidecar)
            wait_ok(url + "/health")
            load = {"engine": "external", "model": "mock-model", "url": direct}
            httpx.post(f"{url}/v1/model/load", json=load, headers={"Authorization": f"Bearer {KEY}"}).raise_for_status()
            workers = _workers_in(_model_status(url))
            targets = Targets(direct, Proxy("sidecar", url, sidecar.pid), None, engine.pid, sidecar_workers=workers)
        else:
            sidecar, url = spawn_sidecar(_sidecar_settings(args), logs)
            started.append(sidecar)
            wait_ok(url + "/ready", timeout_s=args.startup_timeout)
            model = _model_status(url)
            direct = f"http://127.0.0.1:{model['port']}"
            served = "mock-model" if args.engine == "mock" else "bench-model"
            proxy = Proxy("sidecar", url, sidecar.pid)
            adapter = engines.adapter(args.engine, args.engine_executable)
            key = engine_key(model["pid"], adapter.key_env, adapter.key_flag)
            targets = Targets(direct, proxy, None, model["pid"], served, key)
            targets.sidecar_workers = _workers_in(model)
        if args.otel and not args.target:
            started += _traced_sidecar(args, targets, logs)
        for name in args.peers:
            peer = peers.PEERS[name]
            process, peer_url, reason = peers.start(peer, targets.direct, targets.model, KEY, targets.engine_key, logs)
            if process is None or peer_url is None:
                targets.skipped[name] = reason or "not started"
                sys.stderr.write(f"{name}: skipped: {reason}\n")
                continue
            started.append(process)
            targets.compared.append(Proxy(name, peer_url, process.pid, peer.client_key(KEY, targets.engine_key)))
        nginx = find_nginx(args.nginx)
        if nginx:
            master, url = start_nginx(nginx, int(targets.direct.rsplit(":", 1)[1]), logs)
            started.append(master)
            targets.reference = Proxy("nginx", url, worker_pid(master), targets.engine_key or KEY)  # passes it on
        if args.proxy_cpus:
            _pin(args.proxy_cpus, targets)
        yield targets
    finally:
        for process in reversed(started):
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def _model_status(url: str) -> dict[str, Any]:
    """The sidecar's `GET /v1/model`."""
    return httpx.get(f"{url}/v1/model", headers={"Authorization": f"Bearer {KEY}"}).json()  # type: ignore[no-any-return]


def _workers_in(status: dict[str, Any]) -> int:
    """How many data-plane processes the sidecar runs: its status lists them where there are several."""
    return len(status.get("workers") or ()) or 1


def _traced_sidecar(args: argparse.Namespace, targets: Targets, logs: Path) -> list[subprocess.Popen[bytes]]:
    """A second sidecar with OpenTelemetry on, in front of the same engine (loaded as an external one), exporting
    to an OTLP sink of its own; its metrics every 5 s (the SDK's default is 60 s) so that a run sees exports."""
    port = free_port()
    with (logs / "otlp-sink.log").open("wb") as log:
        sink = subprocess.Popen(
            [sys.executable, "-m", "bench.otlp_receiver", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT
        )
    settings = {k: v for k, v in _sidecar_settings(args).items() if not k.startswith("SIDECAR_AUTOLOAD_")}
    settings |= {
        "SIDECAR_OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_METRIC_EXPORT_INTERVAL": "5000",
    }
    sidecar, url = spawn_sidecar(settings, logs, name="sidecar-otel")
    wait_ok(url + "/health")
    load = {"engine": "external", "model": targets.model, "url": targets.direct}
    if targets.engine_key is not None:
        load["api_key"] = targets.engine_key
    httpx.post(f"{url}/v1/model/load", json=load, headers={"Authorization": f"Bearer {KEY}"}).raise_for_status()
    targets.compared.append(Proxy("sidecar+otel", url, sidecar.pid))
    return [sink, sidecar]


def _pin(proxy_cpus: set[int], targets: Targets) -> None:
    """Each proxy on the CPUs given (one at a time is measured), the engine and the load generator on the rest."""
    rest = os.sched_getaffinity(0) - proxy_cpus
    if not rest:
        raise SystemExit("--proxy-cpus leaves no CPU for the engine and the load generator")
    for proxy in targets.proxies:
        if proxy.pid:
            pin(proxy.pid, proxy_cpus, tree=True)  # the sidecar's data-plane workers with it
    if targets.engine_pid:
        pin(targets.engine_pid, rest, tree=True)
    pin(os.getpid(), rest)
