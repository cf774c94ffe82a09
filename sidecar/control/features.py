"""What some engines can do besides serving: sleep mode (GPU memory given back, the process kept) and dynamic
LoRA adapters, called on the engine's own control endpoints."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from engines import LoraApi, SleepApi
from sidecar.control.engine import Engine
from sidecar.control.records import Adapter
from sidecar.engine_state import EngineState
from sidecar.errors import BadGateway, BadRequest, Conflict, engine_error_body
from sidecar.telemetry.gpu import Gpus

# Sleep, wake and adapter loads move weights between GPU, CPU and disk: seconds to minutes for a large model.
ENGINE_CONTROL_TIMEOUT_S = 300.0


def sleep_api(engine: Engine | None) -> tuple[Engine, SleepApi]:
    """The engine's sleep endpoints: 409 without an engine, 400 for one loaded without sleep mode."""
    if engine is None:
        raise Conflict("no engine is loaded", code="no_engine")
    api = engine.adapter.sleep_api(engine.request.args)
    if api is None:
        raise _missing(engine, "sleep mode", engine.adapter.sleep_mode)
    return engine, api


def lora_api(engine: Engine | None, state: EngineState) -> tuple[Engine, LoraApi]:
    """The engine's adapter endpoints: 409 unless it is ready, 400 for one loaded without dynamic LoRA."""
    if state is not EngineState.READY or engine is None:
        raise Conflict(f"the engine is {state}: adapters need a ready engine", code="engine_not_ready")
    api = engine.adapter.lora_api(engine.request.args)
    if api is None:
        raise _missing(engine, "dynamic LoRA", engine.adapter.dynamic_lora)
    return engine, api


def _missing(engine: Engine, feature: str, api: SleepApi | LoraApi | None) -> BadRequest:
    """An engine feature asked of an engine without it: the flag to load it with, where it has one."""
    hint = f' load it with "args": {{"{api.flag}": true}}' if api is not None else " it has none"
    return BadRequest(f"the {engine.adapter.name} engine as loaded has no {feature}:{hint}")


class EngineCalls:
    """Calls to a running engine's control endpoints, over the supervisor's own client."""

    def __init__(self, client: httpx.AsyncClient, gpus: Gpus | None) -> None:
        self.client = client
        self.gpus = gpus

    async def post(self, engine: Engine, path: str, body: dict[str, Any] | None = None) -> float | None:
        """POST to the engine's own control endpoint; the GPU memory it gave back (negative: took), None without
        a GPU. Its refusal is a 400 with its own words where it blames the request, else 502."""
        gpus = self.gpus if self.gpus is not None and self.gpus.available else None
        before = await asyncio.to_thread(gpus.used_mb) if gpus is not None else None
        try:
            answer = await self.client.post(
                engine.base_url + path, json=body, headers=engine.upstream_headers, timeout=ENGINE_CONTROL_TIMEOUT_S
            )
        except httpx.HTTPError as exc:
            raise BadGateway(f"the engine did not answer {path}: {exc or exc.__class__.__name__}") from None
        if answer.status_code >= 400:
            said = engine_error_body(answer.status_code, answer.content)["error"]["message"]
            if answer.status_code in (400, 404, 409, 422):
                raise BadRequest(f"the engine refused: {said}", code="engine_refused")
            raise BadGateway(f"the engine answered {answer.status_code} to {path}: {said}")
        after = await asyncio.to_thread(gpus.used_mb) if gpus is not None and before is not None else None
        return None if before is None or after is None else round(before - after, 1)

    async def adapters(self, engine: Engine) -> list[Adapter]:
        """The LoRA adapters the engine has now, read from its /v1/models (entries that name a parent)."""
        try:
            answer = await self.client.get(engine.base_url + "/v1/models", headers=engine.upstream_headers)
            models = answer.raise_for_status().json().get("data") or []
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            raise BadGateway(f"the engine's model list could not be read: {exc or exc.__class__.__name__}") from None
        return [
            Adapter(name=m.get("id"), path=m.get("root"), parent=m["parent"])
            for m in models
            if isinstance(m, dict) and m.get("parent")
        ]
