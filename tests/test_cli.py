"""`sidecar serve` as a real process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.processes import SidecarProcess, free_port

REPO = Path(__file__).resolve().parent.parent


def test_serve_with_env_example_as_env_answers_health(
    tmp_path: Path, start_sidecar: Callable[..., SidecarProcess]
) -> None:
    shutil.copy(REPO / ".env.example", tmp_path / ".env")
    sidecar = start_sidecar()
    response = httpx.get(f"{sidecar.url}/health")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"
    assert response.json()["engine"]["state"] == "idle"


def test_flags_override_settings(tmp_path: Path) -> None:
    (tmp_path / "other.env").write_text("SIDECAR_PORT=1\n")
    port = free_port()
    sidecar = SidecarProcess(tmp_path, {}, ("--env-file", "other.env", "--port", str(port)))
    sidecar.url = f"http://127.0.0.1:{port}"
    try:
        sidecar.wait_healthy()
    finally:
        sidecar.stop()


def test_no_keys_listens_on_loopback_and_warns(start_sidecar: Callable[..., SidecarProcess]) -> None:
    sidecar = start_sidecar()
    assert "auth_disabled" in sidecar.output()
    assert "loopback only" in sidecar.output()


def test_public_address_without_keys_refuses_to_start(start_sidecar: Callable[..., SidecarProcess]) -> None:
    sidecar = start_sidecar(args=("--host", "0.0.0.0"), wait=False)
    assert sidecar.wait_exit() != 0
    output = sidecar.output()
    assert "refusing to listen on 0.0.0.0 without keys" in output
    assert "SIDECAR_API_KEYS" in output
    assert len(output.strip().splitlines()) == 1


def test_invalid_setting_stops_start_up_with_one_line(start_sidecar: Callable[..., SidecarProcess]) -> None:
    sidecar = start_sidecar(env={"SIDECAR_LOG_LEVEL": "loud"}, wait=False)
    assert sidecar.wait_exit() == 2
    lines = sidecar.output().strip().splitlines()
    assert len(lines) == 1
    assert "settings_invalid" in lines[0]
    assert "SIDECAR_LOG_LEVEL" in lines[0]


def test_json_format_puts_every_line_uvicorns_included_through_structlog(
    start_sidecar: Callable[..., SidecarProcess],
) -> None:
    sidecar = start_sidecar(env={"SIDECAR_LOG_FORMAT": "json"})
    httpx.get(f"{sidecar.url}/health")
    sidecar.stop()
    records = [json.loads(line) for line in sidecar.output().splitlines()]
    assert all({"event", "level", "timestamp", "logger"} <= record.keys() for record in records)
    loggers = {record["logger"] for record in records}
    assert {"uvicorn.error", "sidecar.access", "sidecar.app"} <= loggers


def test_console_script_and_module_both_run() -> None:
    script = Path(sys.executable).parent / "sidecar"
    for command in ([str(script), "--version"], [sys.executable, "-m", "sidecar", "--version"]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=30, check=True)
        assert result.stdout.startswith("sidecar ")


def test_demo_streams_a_chat_through_the_sidecar_and_stops_everything(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "demo", "--args", json.dumps({"ttft-ms": 100, "tokens": 8})],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    answer, _, metrics = result.stdout.partition("usage.performance:")
    assert len(answer.split("\n\n", 1)[1].split()) == 8  # the streamed words, after the request line
    performance = json.loads(metrics)
    assert performance["ttft_ms"] >= 100 and performance["completion_tokens"] == 8
    assert "model_unload" in result.stderr and "sidecar_stopped" in result.stderr


def test_demo_of_an_engine_not_registered_says_so_and_starts_nothing(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "demo", "--engine", "nope"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert "autoload_failed" in result.stderr and "known engines: external" in result.stderr
    assert "Traceback" not in result.stderr and "sidecar_started" not in result.stderr
