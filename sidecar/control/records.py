"""What the supervisor answers, typed: the engine's status, each command's answer, and the engine's description
the data-plane workers fetch. The JSON the control plane sends is these, as they are."""

from __future__ import annotations

import time
from typing import TypedDict

from pydantic import BaseModel, ConfigDict, SecretStr

from engines import adapter as registered_adapter
from sidecar.control.engine import Engine, LoadRequest
from sidecar.control.shared import WorkerSlot
from sidecar.engine_state import EngineState


class EngineStatus(TypedDict):
    """`GET /v1/model`."""

    state: EngineState
    engine: str | None
    model: str | None
    served_model_name: str | None
    pid: int | None
    port: int | None
    started_at: str | None  # ISO 8601, UTC
    uptime_s: float | None
    load_time_s: float | None
    restarts: int
    ttl_s: float | None
    idle_unload_in_s: float | None
    exit_code: int | None
    last_error: str | None
    output_tail: list[str]
    log_followers: int
    workers: list[WorkerSlot] | None


class ReadyEngine(TypedDict):
    """A load's answer once the engine is ready (200)."""

    state: EngineState
    engine: str | None
    model: str | None
    served_model_name: str | None
    pid: int | None
    port: int | None
    load_time_s: float | None
    gpu_memory_used_mb: float | None


# A load's answer: (200, the ready engine) with `wait`, else (202, the status once its process exists).
Loaded = tuple[int, ReadyEngine | EngineStatus]


class Unloaded(TypedDict, total=False):
    state: EngineState  # always there; the rest only where an engine was stopped
    exit_code: int | None
    freed_gpu_memory_mb: float | None


class Slept(TypedDict):
    state: EngineState
    level: int
    freed_gpu_memory_mb: float | None


class Woken(TypedDict):
    state: EngineState
    gpu_memory_taken_mb: float | None


class Adapter(TypedDict):
    """A LoRA adapter as the engine lists it."""

    name: str | None
    path: str | None
    parent: str


class EngineDescription(BaseModel):
    """What a data-plane worker needs to send requests to the engine (its key included: it goes over the run's
    private socket only), fetched when the engine's generation changes."""

    model_config = ConfigDict(frozen=True)

    request: LoadRequest
    api_key: str | None  # the request's, in clear (a LoadRequest serializes its key masked)
    base_url: str
    port: int | None
    started_at: float
    uptime_s: float
    load_time_s: float | None
    upstream_headers: dict[str, str]
    masked: tuple[str, ...]  # the worker masks what the supervisor's process does, for as long as it has the engine

    @classmethod
    def of(cls, engine: Engine) -> EngineDescription:
        key = engine.request.api_key
        return cls(
            request=engine.request,
            api_key=key.get_secret_value() if key else None,
            base_url=engine.base_url,
            port=engine.port,
            started_at=engine.started_at,
            uptime_s=time.monotonic() - engine.started_monotonic,
            load_time_s=engine.load_time_s,
            upstream_headers=engine.upstream_headers,
            masked=engine.masked,
        )

    def engine(self, executables: dict[str, str]) -> Engine:
        """The engine as the supervisor's process runs it, without its process (that is the owner's)."""
        request = self.request.model_copy(update={"api_key": SecretStr(self.api_key) if self.api_key else None})
        adapter = registered_adapter(request.engine, executables.get(request.engine))
        started_monotonic = time.monotonic() - self.uptime_s
        return Engine(
            request,
            adapter,
            self.base_url,
            self.port,
            None,
            self.started_at,
            started_monotonic,
            self.load_time_s,
            upstream_headers=self.upstream_headers,
            masked=self.masked,
        )


class Described(BaseModel):
    """`GET /internal/engine`: the engine's generation, and its description while there is one."""

    generation: int
    engine: EngineDescription | None
