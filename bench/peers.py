"""The proxies users would pick instead of the sidecar, for `python -m bench --peers`: LiteLLM's proxy and vLLM's
router, both from PyPI. Each is installed on demand into an environment of its own beside the repository
(`.venv-litellm`, `.venv-vllm-router`), at the version the docs' figures were measured with, and started in front
of the bench's engine as its users run it; one that cannot be installed or started is skipped, saying why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from sidecar.control.engine import free_port

REPO = Path(__file__).resolve().parent.parent
_INSTALL_TIMEOUT_S = 1200.0
_START_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Peer:
    name: str
    requirement: str  # what pip installs
    executable: str  # in the environment's bin/
    # (bin, engine URL, port, model, key, the engine's key or None, logs)
    command: Callable[[Path, str, int, str, str, str | None, Path], list[str]]
    env: dict[str, str]
    has_keys: bool  # checks its clients' keys, and sends the engine's of its own; else passes on what clients send
    root: Path = REPO  # where its environment goes

    @property
    def environment(self) -> Path:
        return self.root / f".venv-{self.name}"

    def client_key(self, key: str, engine_key: str | None) -> str:
        """What its clients send it: the bench's key where it checks keys of its own, else the engine's (if any)."""
        return key if self.has_keys else engine_key or key


def _litellm(
    bin_dir: Path, engine: str, port: int, model: str, key: str, engine_key: str | None, logs: Path
) -> list[str]:
    """LiteLLM's proxy as its docs run it in production: a config with the one model, a master key, one worker."""
    params = {"model": f"openai/{model}", "api_base": f"{engine}/v1", "api_key": engine_key or "unused"}
    config = {
        "model_list": [{"model_name": model, "litellm_params": params}],
        "general_settings": {"master_key": key},
    }
    path = logs / "litellm.yaml"
    path.write_text(json.dumps(config))  # YAML reads JSON
    return [
        str(bin_dir / "litellm"),
        "--config",
        str(path),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        "1",
    ]


def _vllm_router(
    bin_dir: Path, engine: str, port: int, model: str, key: str, engine_key: str | None, logs: Path
) -> list[str]:
    """vLLM's router (Rust) with the engine as its one worker, its own defaults otherwise."""
    return [
        str(bin_dir / "vllm-router"),
        "--worker-urls",
        engine,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--prometheus-port",
        str(free_port()),
        "--log-level",
        "warning",
    ]


PEERS = {
    "litellm": Peer(
        "litellm",
        "litellm[proxy]==1.108.7",  # later releases need litellm-proxy, which the registry here lacks
        "litellm",
        _litellm,
        {"LITELLM_MODE": "PRODUCTION", "LITELLM_LOG": "ERROR"},
        has_keys=True,
    ),
    "vllm-router": Peer("vllm-router", "vllm-router==0.1.17", "vllm-router", _vllm_router, {}, has_keys=False),
}


def installed(peer: Peer, log: Path) -> str | None:
    """None once the peer is installed (now, or before); else why it cannot be."""
    if (peer.environment / "bin" / peer.executable).exists():
        return None
    try:
        with log.open("ab") as out:
            subprocess.run(
                [sys.executable, "-m", "venv", "--clear", str(peer.environment)], check=True, stdout=out, stderr=out
            )
            pip = [str(peer.environment / "bin" / "pip"), "install", "--quiet", peer.requirement]
            subprocess.run(pip, check=True, stdout=out, stderr=out, timeout=_INSTALL_TIMEOUT_S)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        return f"pip could not install {peer.requirement} ({exc.__class__.__name__}; see {log})"
    return None


def start(
    peer: Peer, engine: str, model: str, key: str, engine_key: str | None, logs: Path
) -> tuple[subprocess.Popen[bytes] | None, str | None, str | None]:
    """The peer started in front of the engine (`engine_key`: the one it needs, if any): its process and URL, or
    None, None and why not."""
    reason = installed(peer, logs / f"{peer.name}-install.log")
    if reason is not None:
        return None, None, reason
    port = free_port()
    argv = peer.command(peer.environment / "bin", engine, port, model, key, engine_key, logs)
    with (logs / f"{peer.name}.log").open("wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=os.environ | peer.env, cwd=logs)
    url = f"http://127.0.0.1:{port}"
    if _answers(url, model, peer.client_key(key, engine_key), process):
        return process, url, None
    process.terminate()
    process.wait(timeout=30)
    return None, None, f"{peer.name} did not answer a chat within {_START_TIMEOUT_S:.0f} s (see {log.name})"


def _answers(url: str, model: str, key: str, process: subprocess.Popen[bytes]) -> bool:
    """Until a one-token chat through the peer comes back 200 (each peer says it is ready its own way)."""
    body = {"model": model, "max_tokens": 1, "messages": [{"role": "user", "content": "ready?"}]}
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        try:
            answer = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
            if answer.status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    return False
