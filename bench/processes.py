"""The sidecar as the bench starts it: its own process, on a free loopback port, its output in a file."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from sidecar.supervisor import free_port


def spawn_sidecar(settings: dict[str, str], workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`sidecar serve` with these SIDECAR_* settings (none inherited); the process and its URL."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")} | settings
    env["SIDECAR_PORT"] = str(port)
    process = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "serve"],
        env=env,
        cwd=workdir,
        stdout=(workdir / "sidecar.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    return process, f"http://127.0.0.1:{port}"


def wait_ok(url: str, timeout_s: float = 60) -> None:
    """Until `url` answers 200."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer 200 within {timeout_s} s")
