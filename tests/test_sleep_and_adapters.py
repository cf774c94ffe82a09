"""Sleep and wake, and LoRA adapters, through the adapter, with the real sidecar and the mock engine playing vLLM.

The mock serves vLLM's /sleep, /wake_up, /is_sleeping, /v1/load_lora_adapter and /v1/unload_lora_adapter only
when started with vLLM's flags and the variables vLLM needs for them, so these tests see the adapter set both.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.processes import SidecarProcess, bearer, engine_key, group_members, wait_until

Start = Callable[..., SidecarProcess]
ADMIN = {"Authorization": "Bearer model-admin-key-0123"}
DATA_KEY = "model-data-key-4567"
DATA = {"Authorization": f"Bearer {DATA_KEY}"}
KEYS = {"SIDECAR_ADMIN_KEYS": "model-admin-key-0123", "SIDECAR_API_KEYS": "model-data-key-4567"}
JSON_LOGS = {"SIDECAR_LOG_FORMAT": "json", **KEYS}


def _post(sidecar: SidecarProcess, path: str, body: Any = None) -> httpx.Response:
    return httpx.post(f"{sidecar.url}{path}", json=body, headers=ADMIN, timeout=30)


def _load(sidecar: SidecarProcess, **args: Any) -> dict[str, Any]:
    loaded = _post(sidecar, "/v1/model/load", {"engine": "mock", "model": "base", "args": args})
    assert loaded.status_code == 200, loaded.text
    body: dict[str, Any] = loaded.json()
    return body


def _state(sidecar: SidecarProcess) -> str:
    state: str = httpx.get(f"{sidecar.url}/v1/model", headers=ADMIN).json()["state"]
    return state


def _logged(sidecar: SidecarProcess, event: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in sidecar.output().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == event]


# -- sleep and wake -------------------------------------------------------------------------------------------


def test_sleep_frees_the_engine_the_data_plane_waits_wake_brings_it_back(start_sidecar: Start) -> None:
    sidecar = start_sidecar(JSON_LOGS)
    engine = f"http://127.0.0.1:{_load(sidecar, **{'enable-sleep-mode': True})['port']}"

    slept = _post(sidecar, "/v1/model/sleep", {"level": 1})
    assert slept.status_code == 200, slept.text
    assert slept.json() == {"state": "sleeping", "level": 1, "freed_gpu_memory_mb": None}  # no GPU here
    assert httpx.get(f"{engine}/is_sleeping").json() == {"is_sleeping": True}  # the engine itself sleeps
    assert _state(sidecar) == "sleeping"
    assert httpx.get(f"{sidecar.url}/ready").status_code == 503
    answered = sidecar.chat(DATA_KEY, "base")
    assert answered.status_code == 503 and answered.headers["retry-after"]
    assert answered.json()["error"]["code"] == "model_sleeping"

    partly = _post(sidecar, "/v1/model/wake", {"tags": ["weights"]})  # vLLM's partial wake: the sidecar wakes all
    assert partly.status_code == 400 and partly.json()["error"]["param"] == "tags"
    assert _state(sidecar) == "sleeping"
    woken = _post(sidecar, "/v1/model/wake")
    assert woken.status_code == 200 and woken.json() == {"state": "ready", "gpu_memory_taken_mb": None}
    assert httpx.get(f"{engine}/is_sleeping").json() == {"is_sleeping": False}
    assert sidecar.chat(DATA_KEY, "base").status_code == 200
    (sleep,) = _logged(sidecar, "model_sleep")
    (wake,) = _logged(sidecar, "model_wake")
    assert sleep["sleep_level"] == 1 and sleep["duration_ms"] > 0 and wake["duration_ms"] > 0


def test_sleep_waits_for_the_requests_in_flight(start_sidecar: Start) -> None:
    sidecar = start_sidecar(KEYS)
    _load(sidecar, **{"enable-sleep-mode": True})
    answers: list[httpx.Response] = []
    streaming = threading.Thread(target=lambda: answers.append(sidecar.chat(DATA_KEY, "base", itl_ms=300)))  # about 1 s
    streaming.start()
    wait_until(lambda: "sidecar_requests_active 1.0" in httpx.get(f"{sidecar.url}/metrics").text, timeout_s=5)
    assert _post(sidecar, "/v1/model/sleep").status_code == 200  # level 1 by default
    assert not streaming.is_alive(), "the sleep was answered before the request in flight ended"
    streaming.join()
    assert answers[0].status_code == 200 and answers[0].json()["usage"]["completion_tokens"] == 4


def test_unload_while_asleep_stops_everything(start_sidecar: Start) -> None:
    sidecar = start_sidecar(KEYS)
    pid = _load(sidecar, **{"enable-sleep-mode": True})["pid"]
    assert _post(sidecar, "/v1/model/sleep").status_code == 200
    for body in ({"drain": 5}, {"drain_timeout_s": -1}, {"drain_timeout_s": True}):  # a typo is not the default
        refused = _post(sidecar, "/v1/model/unload", body)
        assert refused.status_code == 400, (body, refused.text)
    assert _state(sidecar) == "sleeping" and group_members(pid) != []
    unloaded = _post(sidecar, "/v1/model/unload", {})
    assert unloaded.status_code == 200 and unloaded.json()["state"] == "idle"
    assert group_members(pid) == []


def test_sleep_and_wake_refused_where_they_cannot_be_changing_nothing(start_sidecar: Start) -> None:
    sidecar = start_sidecar(KEYS)
    refused = _post(sidecar, "/v1/model/sleep")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "no_engine"
    _load(sidecar)  # without --enable-sleep-mode
    refused = _post(sidecar, "/v1/model/sleep")
    assert refused.status_code == 400 and '"enable-sleep-mode": true' in refused.json()["error"]["message"]
    assert _state(sidecar) == "ready"

    with_sleep = {"engine": "mock", "model": "base", "args": {"enable-sleep-mode": True}, "replace": True}
    assert _post(sidecar, "/v1/model/load", with_sleep).status_code == 200
    assert _post(sidecar, "/v1/model/wake").status_code == 409  # awake already
    for body in ({"level": 3}, {"level": 0}, {"level": "1"}, {"level": True}, {"depth": 1}, [1]):
        refused = _post(sidecar, "/v1/model/sleep", body)
        assert refused.status_code == 400, (body, refused.text)
        assert _state(sidecar) == "ready"
    assert sidecar.chat(DATA_KEY, "base").status_code == 200


def test_a_sleeping_engine_is_not_replaced_without_replace(start_sidecar: Start) -> None:
    sidecar = start_sidecar(KEYS)
    pid = _load(sidecar, **{"enable-sleep-mode": True})["pid"]
    assert _post(sidecar, "/v1/model/sleep").status_code == 200
    assert _post(sidecar, "/v1/model/load", {"engine": "mock", "model": "other"}).status_code == 409
    status = httpx.get(f"{sidecar.url}/v1/model", headers=ADMIN).json()
    assert (status["state"], status["pid"]) == ("sleeping", pid)


# -- LoRA adapters ------------------------------------------------------------------------------------------


def _adapters(sidecar: SidecarProcess) -> list[dict[str, Any]]:
    listed = httpx.get(f"{sidecar.url}/v1/model/adapters", headers=ADMIN)
    assert listed.status_code == 200, listed.text
    data: list[dict[str, Any]] = listed.json()["data"]
    return data


def test_adapters_load_list_serve_and_unload_as_the_engine_has_them(start_sidecar: Start, tmp_path: Path) -> None:
    sidecar = start_sidecar(JSON_LOGS)
    loaded = _load(sidecar, **{"enable-lora": True})
    engine, key = f"http://127.0.0.1:{loaded['port']}", engine_key(loaded["pid"], "VLLM_API_KEY")
    sql = tmp_path / "sql-lora"
    sql.mkdir()
    assert _adapters(sidecar) == []

    loaded = _post(sidecar, "/v1/model/adapters/load", {"name": "sql", "path": str(sql)})
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["data"] == [{"name": "sql", "path": str(sql), "parent": "base"}]
    models = httpx.get(f"{sidecar.url}/v1/models", headers=DATA).json()["data"]
    assert [m["id"] for m in models] == ["base", "sql"]  # clients see the adapter as a model
    assert sidecar.chat(DATA_KEY, model="sql").status_code == 200

    # Read back from the engine, not remembered: an adapter loaded behind the sidecar's back shows too.
    other = tmp_path / "other-lora"
    other.mkdir()
    lora = {"lora_name": "other", "lora_path": str(other)}
    httpx.post(f"{engine}/v1/load_lora_adapter", json=lora, headers=bearer(key)).raise_for_status()
    assert [a["name"] for a in _adapters(sidecar)] == ["sql", "other"]

    unloaded = _post(sidecar, "/v1/model/adapters/unload", {"name": "sql"})
    assert unloaded.status_code == 200 and [a["name"] for a in unloaded.json()["data"]] == ["other"]
    (load,) = _logged(sidecar, "adapter_load")
    (unload,) = _logged(sidecar, "adapter_unload")
    assert load["adapter"] == "sql" and load["duration_ms"] > 0 and unload["adapter"] == "sql"


def test_what_the_engine_refuses_is_a_400_in_its_words_and_changes_nothing(
    start_sidecar: Start, tmp_path: Path
) -> None:
    sidecar = start_sidecar(KEYS)
    _load(sidecar, **{"enable-lora": True})
    sql = tmp_path / "sql-lora"
    sql.mkdir()
    assert _post(sidecar, "/v1/model/adapters/load", {"name": "sql", "path": str(sql)}).status_code == 200
    for body, said in (
        ({"name": "sql", "path": str(sql)}, "already been loaded"),
        ({"name": "ghost", "path": str(tmp_path / "missing")}, "No adapter found"),
    ):
        refused = _post(sidecar, "/v1/model/adapters/load", body)
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "engine_refused"
        assert said in refused.json()["error"]["message"]
    refused = _post(sidecar, "/v1/model/adapters/unload", {"name": "ghost"})
    assert refused.status_code == 400 and "cannot be found" in refused.json()["error"]["message"]
    assert [a["name"] for a in _adapters(sidecar)] == ["sql"]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/model/adapters/load", {"name": "sql"}, "path"),
        ("/v1/model/adapters/load", {"path": "/x"}, "name"),
        ("/v1/model/adapters/load", {"name": "two words", "path": "/x"}, "name"),
        ("/v1/model/adapters/load", {"name": "sql", "path": "/x", "rank": 8}, "rank"),
        ("/v1/model/adapters/unload", {}, "name"),
    ],
)
def test_a_bad_adapter_request_is_a_400_naming_the_field(
    start_sidecar: Start, path: str, body: dict[str, Any], param: str
) -> None:
    sidecar = start_sidecar(KEYS)
    _load(sidecar, **{"enable-lora": True})
    refused = _post(sidecar, path, body)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == param
    assert _adapters(sidecar) == []


def test_engines_without_dynamic_lora_say_so(start_sidecar: Start) -> None:
    sidecar = start_sidecar(KEYS)
    refused = httpx.get(f"{sidecar.url}/v1/model/adapters", headers=ADMIN)
    assert refused.status_code == 409
    _load(sidecar)  # without --enable-lora
    for refused in (
        httpx.get(f"{sidecar.url}/v1/model/adapters", headers=ADMIN),
        _post(sidecar, "/v1/model/adapters/load", {"name": "sql", "path": "/x"}),
    ):
        assert refused.status_code == 400 and '"enable-lora": true' in refused.json()["error"]["message"]
    assert httpx.get(f"{sidecar.url}/v1/model/adapters", headers=DATA).status_code == 403  # an admin's business


def test_sleep_and_wake_during_a_load_are_409_and_the_load_goes_on(start_sidecar: Start) -> None:
    sidecar = start_sidecar(KEYS)
    slow = {"engine": "mock", "model": "base", "wait": False, "args": {"enable-sleep-mode": True, "startup-delay-s": 1}}
    assert _post(sidecar, "/v1/model/load", slow).status_code == 202
    for path in ("/v1/model/sleep", "/v1/model/wake"):
        refused = _post(sidecar, path)
        assert refused.status_code == 409 and "loading" in refused.json()["error"]["message"], refused.text
    wait_until(lambda: _state(sidecar) == "ready", timeout_s=20)
    assert _post(sidecar, "/v1/model/sleep").status_code == 200
