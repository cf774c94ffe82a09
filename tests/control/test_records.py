"""The engine's description a data-plane worker fetches: the key it needs goes through, whole and only where it
must, and what comes back is the engine the supervisor runs."""

from __future__ import annotations

import json
import time

from engines import adapter as registered_adapter
from sidecar.control.engine import Engine, LoadRequest
from sidecar.control.records import Described, EngineDescription

KEY = "sk-hosted-4f2a"


def _engine() -> Engine:
    request = LoadRequest(engine="external", model="m", url="https://api.example.com", api_key=KEY, env={"A": "b"})
    adapter = registered_adapter("external")
    return Engine(
        request,
        adapter,
        "https://api.example.com",
        None,
        None,
        1.7e9,
        time.monotonic() - 5,
        0.25,
        upstream_headers=request.upstream_headers(),
    )


def test_the_description_carries_the_key_once_in_clear_and_the_request_masked() -> None:
    text = Described(generation=4, engine=EngineDescription.of(_engine())).model_dump_json()
    sent = json.loads(text)
    assert sent["engine"]["request"]["api_key"] == "**********"  # the request as status would show it
    assert sent["engine"]["api_key"] == KEY  # the worker needs it: this goes over the run's private socket only
    assert text.count(KEY) == 2  # that field and the Authorization header the engine gets


def test_a_worker_rebuilds_the_engine_the_supervisor_runs() -> None:
    original = _engine()
    described = Described.model_validate_json(
        Described(generation=4, engine=EngineDescription.of(original)).model_dump_json()
    )
    assert described.generation == 4 and described.engine is not None
    engine = described.engine.engine(executables={})
    assert engine.request.api_key is not None and engine.request.api_key.get_secret_value() == KEY
    assert engine.request.upstream_headers() == {"authorization": f"Bearer {KEY}"}
    assert engine.request.secrets() == original.request.secrets()  # what the worker's log redactor masks
    assert (engine.base_url, engine.port, engine.process, engine.adapter.name) == (
        original.base_url,
        None,
        None,
        "external",
    )
    assert abs(engine.started_monotonic - original.started_monotonic) < 1.0  # its uptime, carried across


def test_no_engine_is_described_as_none() -> None:
    assert Described.model_validate_json(Described(generation=0, engine=None).model_dump_json()).engine is None
