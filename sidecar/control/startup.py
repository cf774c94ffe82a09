"""An engine's start: its process spawned (or an external server's address taken), then polled until ready."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import secrets
import socket
import time
from urllib.parse import urlsplit

import httpx
import psutil

from engines import EngineAdapter
from sidecar.control.engine import Engine, LoadRequest, free_port
from sidecar.control.process import EngineProcess
from sidecar.control.runfile import EngineRecord
from sidecar.errors import BadGateway, GatewayTimeout
from sidecar.logs import get_logger
from sidecar.redaction import Redactor
from sidecar.settings import ENV_PREFIX

log = get_logger("sidecar.supervisor")

READY_POLL_S = 0.1


async def spawn(
    request: LoadRequest,
    adapter: EngineAdapter,
    redactor: Redactor,
    record: EngineRecord,
    kill_grace_s: float,
    output_lines_per_s: float = 0,
) -> Engine:
    """The engine for `request`: its process started (502 when it cannot be), or the external server named."""
    now = (time.time(), time.monotonic())
    # The request's env goes to the child only, its key and headers to the engine only; their values are masked
    # in every log line from now on, until the engine is let go (`Engine.masked`).
    masked = tuple(request.secrets())
    if not adapter.starts_process:
        assert request.url is not None
        redactor.register(*masked)
        base_url = request.url.rstrip("/")
        upstream_headers = request.upstream_headers()
        return Engine(request, adapter, base_url, None, None, *now, upstream_headers=upstream_headers, masked=masked)
    port = free_port()
    argv = adapter.command(request.model, port, request.args, request.served_model_name)
    env = {**inherited_environment(), **adapter.environment(request.args), **request.env}
    upstream_headers = {}
    key_in = None  # where the engine holds its key, named in the log (never the key): for whoever asks it directly
    if adapter.key_env is not None or adapter.key_flag is not None:
        # A key of this start's own: the engine's port answers the sidecar alone.
        key = new_engine_key()
        masked += (key,)
        upstream_headers["authorization"] = f"Bearer {key}"
        if adapter.key_env is not None:
            key_in = adapter.key_env
            env[key_in] = key  # its environment, which only its own user can read
        else:
            key_in = f"--{adapter.key_flag}"
            argv += [key_in, key]
    redactor.register(*masked)  # before the command line is logged
    log.info("engine_spawn", engine=adapter.name, argv=argv, port=port, env_names=sorted(request.env), key_in=key_in)
    try:
        process = await EngineProcess.spawn(
            adapter.name, argv, env, redactor, record, kill_grace_s, port, output_lines_per_s, masked
        )
    except OSError as exc:  # the process forgot `masked` (none started, or its output ended)
        raise BadGateway(
            f"cannot start engine {adapter.name}: {exc.strerror or exc}", code="engine_spawn_failed"
        ) from None
    base_url = f"http://127.0.0.1:{port}"
    return Engine(request, adapter, base_url, port, process, *now, upstream_headers=upstream_headers, masked=masked)


async def wait_ready(engine: Engine, probe: httpx.AsyncClient, timeout_s: float, kill_grace_s: float) -> None:
    """Poll readiness until the deadline; an exit during start-up ends the wait at once (502), the deadline
    stops the process (504). Either way its exit code is the process's `returncode`."""
    deadline = time.monotonic() + timeout_s
    process = engine.process
    if process is None:
        await _check_reachable(engine, probe)
    while True:
        if process is not None and process.exited.is_set():
            await process.stop(kill_grace_s)  # the rest of its group
            tail = " | ".join(process.output.tail(5))
            raise BadGateway(
                f"engine {engine.adapter.name} exited during start-up with exit code {process.returncode}: {tail}",
                code="engine_start_failed",
            )
        if await engine.adapter.is_ready(probe, engine.base_url, engine.upstream_headers):
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            if process is not None:
                await process.stop(kill_grace_s)
            raise GatewayTimeout(
                f"engine {engine.adapter.name} was not ready within {timeout_s:g}s; it was stopped",
                code="engine_start_timeout",
            )
        wait = min(READY_POLL_S, remaining)
        if process is None:
            await asyncio.sleep(wait)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.exited.wait(), wait)


async def _check_reachable(engine: Engine, probe: httpx.AsyncClient) -> None:
    """A server that should be running already: nothing listening, or a refused key, is final (502)."""
    try:
        answer = await probe.get(engine.base_url + "/v1/models", headers=engine.upstream_headers)
    except httpx.ConnectError as exc:  # refused, unknown host, or a certificate that does not verify
        raise BadGateway(f"cannot reach {engine.base_url}: {exc}", code="engine_unreachable") from None
    except httpx.HTTPError:
        return
    if answer.status_code in (401, 403):
        raise BadGateway(
            f"{engine.base_url} refused the key ({answer.status_code}): check 'api_key'", code="engine_unauthorized"
        )


def leads_to_sidecar(url: str, host: str, port: int) -> bool:
    """Whether an external engine's `url` reaches the sidecar's own socket (`host`, `port`), where every request
    would come back to it. Only a URL on the sidecar's port is resolved (a blocking lookup: run it in a thread)."""
    parts = urlsplit(url)
    if parts.hostname is None or (parts.port or (443 if parts.scheme == "https" else 80)) != port:
        return False
    reached = _addresses(parts.hostname, port)
    if host not in ("", "0.0.0.0", "::"):
        return not reached.isdisjoint(_addresses(host, port))
    # Listening on every address: any of the machine's own reaches it, loopback and the unspecified one among them.
    own = {entry.address.split("%")[0] for entries in psutil.net_if_addrs().values() for entry in entries}
    return any(address in own or _loopback_or_unspecified(address) for address in reached)


def _addresses(name: str, port: int) -> set[str]:
    try:
        return {str(info[4][0]).split("%")[0] for info in socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)}
    except (socket.gaierror, UnicodeError):
        return set()


def _loopback_or_unspecified(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or ip.is_unspecified


def new_engine_key() -> str:
    """A key of one engine start's own: 256 random bits, in hex. Not URL-safe base64, whose keys begin with `-` one
    time in 64: an engine that takes its key by a flag (SGLang's `--api-key`) reads such a key as a flag of its own,
    and exits at once."""
    return secrets.token_hex(32)


def inherited_environment() -> dict[str, str]:
    """What the engine inherits of the sidecar's environment: all of it (CUDA, Hugging Face, the engine's own
    variables) but the sidecar's settings, its keys among them. An engine, its custom code (`trust_remote_code`)
    or a crash dump of it never holds them."""
    return {name: value for name, value in os.environ.items() if not name.upper().startswith(ENV_PREFIX)}
