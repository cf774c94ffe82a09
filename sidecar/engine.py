"""What the supervisor runs: a load request as validated, the engine it started, and a port for it."""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, field_validator

from engines import ArgValue, EngineAdapter
from sidecar.process import EngineProcess

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    engine: str = Field(min_length=1)
    model: str = Field(min_length=1)
    args: dict[str, ArgValue] = {}
    env: dict[str, str] = {}
    served_model_name: str | None = None
    wait: bool = True
    startup_timeout_s: float | None = Field(None, gt=0)
    replace: bool = False
    url: str | None = Field(None, pattern=r"^https?://[^\s/]+(/[^\s]*)?$")

    @field_validator("env")
    @classmethod
    def _env_names(cls, env: dict[str, str]) -> dict[str, str]:
        bad = [name for name in env if not _ENV_NAME.fullmatch(name)]
        if bad:
            raise ValueError(f"invalid environment variable name(s): {', '.join(map(repr, bad))}")
        return env


@dataclass
class Engine:
    """What runs now: the request that started it, its adapter, and its process (none for `external`)."""

    request: LoadRequest
    adapter: EngineAdapter
    base_url: str
    port: int | None
    process: EngineProcess | None
    started_at: float  # wall clock, for people
    started_monotonic: float
    load_time_s: float | None = None

    @property
    def served_model(self) -> str:
        return self.request.served_model_name or self.request.model


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
