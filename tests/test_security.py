"""What each key can and cannot do, and what a client cannot make the sidecar do or write, against a real sidecar
and mock engine. Each test is a hole a hostile pass found, sent as it was found."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.processes import SidecarProcess, bearer, engine_key, free_port, wait_until

Start = Callable[..., SidecarProcess]
DATA_KEY = "datakey-probe-51be02"
OTHER_DATA_KEY = "datakey-other-9d04e1"
ADMIN_KEY = "adminkey-probe-7f3a9c"
D = {"Authorization": f"Bearer {DATA_KEY}"}
A = {"Authorization": f"Bearer {ADMIN_KEY}"}
KEYS = {"SIDECAR_API_KEYS": f"{DATA_KEY},{OTHER_DATA_KEY}", "SIDECAR_ADMIN_KEYS": ADMIN_KEY}


def _load(sidecar: SidecarProcess, **body: Any) -> httpx.Response:
    return httpx.post(f"{sidecar.url}/v1/model/load", json={"engine": "mock", "model": "mock-model"} | body, headers=A)


@pytest.fixture
def sidecar(start_sidecar: Start, tmp_path: Path) -> SidecarProcess:
    return start_sidecar(KEYS | {"SIDECAR_LOG_DIR": str(tmp_path / "logs")})


def _all_logs(sidecar: SidecarProcess, tmp_path: Path) -> dict[str, str]:
    """The console and every file sink, once the sidecar has stopped (everything flushed)."""
    sidecar.stop()
    logs = {name: (tmp_path / "logs" / name).read_text() for name in ("sidecar.log", "errors.log", "sidecar.jsonl")}
    return logs | {"console": sidecar.output()}


def test_a_data_key_cannot_reach_the_engines_admin_endpoints(sidecar: SidecarProcess) -> None:
    assert _load(sidecar, args={"enable-lora": True, "enable-sleep-mode": True}).status_code == 200
    lora = {"lora_name": "by-data-key", "lora_path": "/etc"}
    for path, body in [
        ("/v1/load_lora_adapter", lora),
        ("/v1/unload_lora_adapter", {"lora_name": "by-data-key"}),
        ("/v1/mock/../load_lora_adapter", lora),
        ("/v1/models/..%2Fload_lora_adapter", lora),
    ]:
        refused = httpx.post(f"{sidecar.url}{path}", json=body, headers=D)
        assert refused.status_code in (400, 404), (path, refused.text)
        assert refused.json()["error"]["type"] in ("not_found_error", "invalid_request_error")
    assert (
        httpx.post(f"{sidecar.url}/v1/model/adapters/load", json={"name": "x", "path": "/etc"}, headers=D).status_code
        == 403
    )
    adapters = httpx.get(f"{sidecar.url}/v1/model/adapters", headers=A).json()["data"]
    assert adapters == []  # none was loaded through the engine's own endpoint
    models = httpx.get(f"{sidecar.url}/v1/models", headers=D).json()["data"]
    assert [model["id"] for model in models] == ["mock-model"]
    # The engine's other admin endpoints (vLLM's /sleep and such) are outside /v1 and never forwarded.
    for path in ("/sleep", "/wake_up", "/reset_prefix_cache", "/v1/sleep", "/v1/collective_rpc"):
        assert httpx.post(f"{sidecar.url}{path}", headers=D).status_code == 404, path
    assert sidecar.status(ADMIN_KEY)["state"] == "ready"


@pytest.mark.parametrize(
    "args", [{"ho": "0.0.0.0"}, {"hos": "0.0.0.0"}, {"mod": "evil-name"}, {"po": 1}, {"--p": 1}, {"api-k": "chosen"}]
)
def test_reserved_flags_are_refused_in_every_spelling_argparse_takes(
    sidecar: SidecarProcess, args: dict[str, Any]
) -> None:
    refused = _load(sidecar, args=args)
    assert refused.status_code == 400, refused.text
    assert "is set by the sidecar" in refused.json()["error"]["message"]
    assert sidecar.status(ADMIN_KEY)["state"] == "idle"  # nothing was started


@pytest.mark.parametrize("name", ["PATH", "LD_PRELOAD", "PYTHONPATH"])
def test_a_load_request_cannot_choose_the_program_the_sidecar_runs_or_the_code_it_loads(
    sidecar: SidecarProcess, tmp_path: Path, name: str
) -> None:
    """A folder holding a program named as vLLM's command, and (for the loader and Python) a library and a module:
    named in `env`, the sidecar once ran that program in place of the engine's. Refused now, before anything runs."""
    planted = tmp_path / "planted"
    planted.mkdir()
    ran = tmp_path / "ran"
    (planted / "vllm").write_text(f"#!/bin/sh\n: > {ran}\n")  # a builtin: with PATH the folder, no command is found
    (planted / "vllm").chmod(0o755)
    value = {"PATH": str(planted), "LD_PRELOAD": str(planted / "x.so"), "PYTHONPATH": str(planted)}[name]
    refused = _load(sidecar, engine="vllm", model="m", env={name: value, "HF_TOKEN": "hf_allowed_beside_it"})
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["param"] == "env" and f"'{name}'" in error["message"] and value not in error["message"]
    assert "HF_TOKEN" not in error["message"]  # only what is refused is named
    assert sidecar.status(ADMIN_KEY)["state"] == "idle"
    assert not ran.exists()


@pytest.mark.parametrize(
    "body",
    [
        {"args": {"enable-lora": "--host=0.0.0.0"}},  # once: the engine listened on every interface
        {"args": {"print-env": ["HOME", "--host=0.0.0.0"]}},
        {"model": "--host=0.0.0.0"},
    ],
)
def test_no_value_of_a_load_request_becomes_a_flag_of_the_engine(sidecar: SidecarProcess, body: dict[str, Any]) -> None:
    refused = _load(sidecar, **body)
    assert refused.status_code == 400, refused.text
    assert "begin" in refused.json()["error"]["message"] and "flag" in refused.json()["error"]["message"]
    assert sidecar.status(ADMIN_KEY)["state"] == "idle"  # nothing was started
    loaded = _load(sidecar, args={"enable-lora": True, "max-num-seqs": 4})
    assert loaded.status_code == 200, loaded.text
    sockets = psutil.Process(loaded.json()["pid"]).net_connections("tcp")
    listening = {tuple(conn.laddr) for conn in sockets if conn.status == psutil.CONN_LISTEN}
    assert listening == {("127.0.0.1", loaded.json()["port"])}  # loopback only: the sidecar is its one way in


@pytest.mark.parametrize(
    ("engine", "env"),
    [
        ("llamacpp", {"HOST": "0.0.0.0"}),
        ("llamacpp", {"PORT": "80"}),
        ("tgi", {"HOSTNAME": "0.0.0.0"}),
        ("llamacpp", {"API_KEY": "chosen"}),
        ("tgi", {"API_KEY": "chosen"}),
        ("vllm", {"VLLM_API_KEY": "chosen"}),
        ("mock", {"vllm_api_key": "chosen"}),
    ],
)
def test_no_variable_of_a_load_request_sets_the_engines_address_or_key(
    start_sidecar: Start, engine: str, env: dict[str, str]
) -> None:
    """llama-cpp-python's server listens on $HOST and $PORT over its flags: `{"env": {"HOST": "0.0.0.0"}}` once had
    it listen on every interface. A key of the request's would replace the one the sidecar sends: the engine would
    answer it no more."""
    executables = json.dumps({"llamacpp": sys.executable})  # llama-cpp-python's server, whatever is on PATH
    sidecar = start_sidecar(KEYS | {"SIDECAR_ENGINE_EXECUTABLES": executables})
    refused = _load(sidecar, engine=engine, model="/models/any.gguf", env=env)
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["param"] == "env" and f"'{next(iter(env))}': set by the sidecar for {engine}" in error["message"]
    assert sidecar.status(ADMIN_KEY)["state"] == "idle"


def test_a_run_directory_another_user_can_write_cannot_make_the_sidecar_kill_a_process(
    start_sidecar: Start, tmp_path: Path
) -> None:
    """Its engine record names the process group a starting sidecar stops as one a killed sidecar left: written by
    another user (into a /tmp/sidecar they made first), it once had the sidecar kill the process it named."""
    run = tmp_path / "shared-run"
    run.mkdir()
    run.chmod(0o777)
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        started = psutil.Process(victim.pid).create_time()
        record = {"pid": victim.pid, "pgid": victim.pid, "create_time": started, "engine": "vllm", "port": 1}
        port = free_port()
        (run / f"engine-{port}.json").write_text(json.dumps(record))
        sidecar = start_sidecar(KEYS | {"SIDECAR_RUN_DIR": str(run)}, port=port, wait=False)
        assert sidecar.wait_exit() == 2
        lines = sidecar.output().strip().splitlines()
        assert len(lines) == 1 and "settings_invalid" in lines[0], lines
        assert f"SIDECAR_RUN_DIR {run} can be written by other users" in lines[0]
        assert victim.poll() is None  # alive
    finally:
        victim.kill()
        victim.wait()


def test_only_the_sidecar_reaches_the_engines_guarded_paths(sidecar: SidecarProcess, tmp_path: Path) -> None:
    """The engine's port is on loopback, which every process in the network namespace shares (a pod's other
    containers): each start gets a random key of its own, in its environment, and only the sidecar sends it. A
    caller on the port without it is refused; the key is on no command line and in no log, the engine's own
    output included; the next start has another."""
    loaded = _load(sidecar, args={"print-env": ["VLLM_API_KEY"]})
    assert loaded.status_code == 200, loaded.text
    engine, pid = f"http://127.0.0.1:{loaded.json()['port']}", loaded.json()["pid"]
    chat = {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for headers in ({}, D, A):  # no key, and the sidecar's own keys: none is the engine's
        refused = httpx.post(f"{engine}/v1/chat/completions", json=chat, headers=headers)
        assert refused.status_code == 401, refused.text
    assert httpx.get(f"{engine}/v1/models").status_code == 401
    assert httpx.post(f"{sidecar.url}/v1/chat/completions", json=chat, headers=D).status_code == 200
    key = engine_key(pid, "VLLM_API_KEY")
    assert httpx.post(f"{engine}/v1/chat/completions", json=chat, headers=bearer(key)).is_success
    assert len(key) >= 40 and not any(key in part for part in psutil.Process(pid).cmdline())
    replaced = _load(sidecar, replace=True, args={"print-env": ["VLLM_API_KEY"]})
    assert replaced.status_code == 200, replaced.text
    second = engine_key(replaced.json()["pid"], "VLLM_API_KEY")
    assert second != key
    # The engine's output as the control plane shows it (status's tail; /v1/model/logs reads the same lines).
    wait_until(lambda: "VLLM_API_KEY=" in json.dumps(sidecar.status(ADMIN_KEY)["output_tail"]), timeout_s=10)
    assert second not in json.dumps(sidecar.status(ADMIN_KEY))
    assert httpx.post(f"{sidecar.url}/v1/chat/completions", json=chat, headers=D).status_code == 200
    logs = _all_logs(sidecar, tmp_path)
    assert "mock engine sees VLLM_API_KEY=" in logs["console"]  # the engine wrote it out: masked
    assert "key_in=VLLM_API_KEY" in logs["console"]  # where it is, for whoever asks the engine directly
    for name, text in logs.items():
        assert key not in text and second not in text, name


def test_the_engine_never_holds_the_sidecars_keys(sidecar: SidecarProcess) -> None:
    loaded = _load(sidecar, env={"ENGINE_ONLY": "given-to-the-engine"})
    assert loaded.status_code == 200, loaded.text
    environ = Path(f"/proc/{loaded.json()['pid']}/environ").read_bytes().split(b"\0")
    names = {entry.split(b"=", 1)[0] for entry in environ}
    assert b"ENGINE_ONLY=given-to-the-engine" in environ
    assert not any(name.startswith(b"SIDECAR_") for name in names), names
    joined = b"\0".join(environ)
    assert DATA_KEY.encode() not in joined and ADMIN_KEY.encode() not in joined


def test_no_client_can_forge_a_log_line_or_write_an_escape_sequence(sidecar: SidecarProcess, tmp_path: Path) -> None:
    forged = "/nope%0A2026-12-04T17:00:00Z%20[error%20%20%20%20]%20FORGED_LINE%20%1b[31mRED%0D%C2%9B"
    assert httpx.get(f"{sidecar.url}{forged}").status_code == 404
    refused = _load(sidecar, model="mock-model\n2026-12-04T17:00:00Z [error    ] FORGED_MODEL")
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "model"
    for name, text in _all_logs(sidecar, tmp_path).items():
        assert "FORGED_LINE" in text or name == "errors.log", name  # the request was logged, escaped
        for line in text.splitlines():
            assert not line.startswith("2026-12-04T17:00:00Z"), (name, line)
            assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", line), (name, line)


@pytest.mark.parametrize("path", ["/v1/models%E2%82%AC", "/v1/models/a%20b", "/v1/models/a%0Db", "/v1/models/a%00"])
def test_a_path_that_cannot_be_forwarded_as_it_came_is_a_400(sidecar: SidecarProcess, path: str) -> None:
    assert _load(sidecar).status_code == 200
    answer = httpx.get(f"{sidecar.url}{path}", headers=D)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == "path"


def test_the_engine_gets_the_path_as_the_client_encoded_it(sidecar: SidecarProcess) -> None:
    assert _load(sidecar).status_code == 200
    # %3F stays in the path (a model named "a?b"), never a query the engine reads.
    answer = httpx.get(f"{sidecar.url}/v1/models/a%3Fb", headers=D)
    assert answer.status_code == 404 and "`a?b`" in answer.json()["error"]["message"], answer.text
    model = httpx.get(f"{sidecar.url}/v1/models/mock-model", headers=D)
    assert model.status_code == 200 and model.json()["id"] == "mock-model"


def test_a_password_in_an_external_engines_url_is_refused_and_never_shown(
    sidecar: SidecarProcess, tmp_path: Path
) -> None:
    body = {"engine": "external", "model": "m", "url": "http://user:urlPassw0rd77x@127.0.0.1:1"}
    refused = httpx.post(f"{sidecar.url}/v1/model/load", json=body, headers=A)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "url"
    assert "urlPassw0rd77x" not in refused.text
    assert "urlPassw0rd77x" not in json.dumps(sidecar.status(ADMIN_KEY))
    for name, text in _all_logs(sidecar, tmp_path).items():
        assert "urlPassw0rd77x" not in text, name


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/model/adapters/load", {"name": "\u0000", "path": "/x"}, "name"),
        ("/v1/model/adapters/load", {"name": "a\nb", "path": "/x"}, "name"),
        ("/v1/model/adapters/load", {"name": "sql", "path": "/x\u001b[31m"}, "path"),
        ("/v1/model/load", {"engine": "mock", "model": "m", "served_model_name": "a\nb"}, "served_model_name"),
        ("/v1/model/load", {"engine": "mock", "model": "m", "served_model_name": "two words"}, "served_model_name"),
    ],
)
def test_names_take_no_control_characters(sidecar: SidecarProcess, path: str, body: dict[str, Any], param: str) -> None:
    if path.startswith("/v1/model/adapters"):
        assert _load(sidecar, args={"enable-lora": True}).status_code == 200
    refused = httpx.post(f"{sidecar.url}{path}", json=body, headers=A)
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["param"] == param


def test_a_requests_record_is_read_by_the_key_that_made_it_or_an_admin_key(sidecar: SidecarProcess) -> None:
    assert _load(sidecar).status_code == 200
    body = {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    made = httpx.post(f"{sidecar.url}/v1/chat/completions", json=body, headers=D | {"X-Request-ID": "mine-1"})
    assert made.status_code == 200
    url = f"{sidecar.url}/v1/requests/mine-1"
    wait_until(lambda: httpx.get(url, headers=D).status_code == 200, timeout_s=5)
    record = httpx.get(url, headers=D).json()
    assert record["id"] == "mine-1" and not any(key.startswith("_") for key in record)
    assert httpx.get(url, headers=A).json() == record
    other = httpx.get(url, headers={"X-API-Key": OTHER_DATA_KEY})
    assert other.status_code == 404 and "mine-1" in other.json()["error"]["message"]  # as if it did not exist
