"""What the supervisor runs: a load request as validated (and the other control-plane bodies), the engine it
started, and a port for it."""

from __future__ import annotations

import functools
import random
import re
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from engines import ArgValue, EngineAdapter
from sidecar.control.process import EngineProcess

# Engine ports are chosen above the ports well-known services keep (8000, 8080, 9090...), below the ephemeral range
# (Linux's default: 32768-60999) or above it.
_LOWEST_PORT = 16384
_PORT_TRIES = 64
_EPHEMERAL_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Variables that choose which program runs or what code it loads, read by what every engine is built on: the
# dynamic loader (every `LD_*`), Python, the shell, and the C compilers Triton and torch run at run time. Not
# from a load request (its `env` holds secrets and tuning); where a container needs one, it sets it for the
# sidecar, whose environment the engine inherits.
_CODE_CHOOSING_ENV = frozenset(
    {
        "PATH",
        "GCONV_PATH",
        "GLIBC_TUNABLES",
        "PYTHONPATH",
        "PYTHONHOME",
        "PYTHONSTARTUP",
        "PYTHONUSERBASE",
        "PYTHONPLATLIBDIR",
        "PYTHONEXECUTABLE",
        "PYTHONWARNINGS",  # a warning category's module is imported
        "PYTHONBREAKPOINT",  # a callable is imported at breakpoint()
        "BASH_ENV",
        "ENV",
        "SHELLOPTS",
        "BASHOPTS",
        "PS4",
        "CC",
        "CXX",
    }
)
# A name clients send as `model` (a served model's, a LoRA adapter's): a hub id's characters, nothing that could
# break a log line, a header or a URL.
MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9._:@+=\-/]*$"
# A model or adapter path, or a hub id: any printable text (paths may hold spaces), no control characters.
PRINTABLE = r"^[^\x00-\x1f\x7f-\x9f]+$"
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110's token
# Printable ASCII, spaces and tabs: no header injection, and nothing a request's head cannot carry as it is (RFC 9110
# keeps other bytes for obsolete uses; a str outside ASCII has no one encoding there).
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e]*")
_KEY = re.compile(r"[\x21-\x7e]+")  # a Bearer key: printable ASCII, no space
# Set by the sidecar on every request to the engine; the key goes in `api_key`.
_HEADERS_OWN = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "content-type", "x-request-id", "authorization"}
)


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    engine: str = Field(min_length=1, max_length=256)
    model: str = Field(min_length=1, max_length=4096, pattern=PRINTABLE)
    args: dict[str, ArgValue] = {}
    env: dict[str, str] = {}
    served_model_name: str | None = Field(None, min_length=1, max_length=256, pattern=MODEL_NAME)
    wait: bool = True
    startup_timeout_s: float | None = Field(None, gt=0)
    replace: bool = False
    # Unload after this many seconds without a request (SIDECAR_DEFAULT_TTL_S where not given; 0 there: never).
    ttl_s: float | None = Field(None, gt=0, strict=True)  # strict: `true` is no duration
    url: str | None = Field(None, pattern=r"^https?://[^\s/\x00-\x1f\x7f]+(/[^\s\x00-\x1f\x7f]*)?$")
    # An external engine's key (a hosted API's), sent as `Authorization: Bearer` to it alone; extra headers too.
    api_key: SecretStr | None = Field(None, min_length=1)
    headers: dict[str, str] = {}

    @field_validator("model")
    @classmethod
    def _not_a_flag(cls, model: str) -> str:
        # The model goes on the engine's command line: one beginning with "-" would be read as a flag there.
        if model.startswith("-"):
            raise ValueError("a model may not begin with '-': the engine would read it as a flag (write ./-name)")
        return model

    @field_validator("env")
    @classmethod
    def _env_names(cls, env: dict[str, str]) -> dict[str, str]:
        bad = [name for name in env if not _ENV_NAME.fullmatch(name)]
        if bad:
            raise ValueError(f"invalid environment variable name(s): {', '.join(map(repr, bad))}")
        cut = [name for name, value in env.items() if "\x00" in value]
        if cut:  # an environment's strings end at NUL: the engine would get part of the value
            raise ValueError(f"the value of {', '.join(map(repr, cut))} holds a NUL character")
        chooser = [name for name in env if name.upper() in _CODE_CHOOSING_ENV or name.upper().startswith("LD_")]
        if chooser:
            raise ValueError(
                f"{', '.join(map(repr, chooser))}: a load request cannot set what chooses which program runs or "
                "what code it loads; set it in the sidecar's environment (the container's), which the engine inherits"
            )
        return env

    @field_validator("url")
    @classmethod
    def _no_credentials(cls, url: str | None) -> str | None:
        # A URL is shown in status, errors and logs: a password in it would be too. Never echoed here either.
        if url is not None and "@" in url.split("://", 1)[1].split("/", 1)[0]:
            raise ValueError("credentials in 'url' are not accepted: send the engine's key as 'api_key'")
        return url

    @field_validator("api_key")
    @classmethod
    def _key_characters(cls, key: SecretStr | None) -> SecretStr | None:
        if key is not None and not _KEY.fullmatch(key.get_secret_value()):
            raise ValueError("an engine's key is printable ASCII with no space (it goes in a header)")
        return key

    @field_validator("headers")
    @classmethod
    def _header_fields(cls, headers: dict[str, str]) -> dict[str, str]:
        for name, value in headers.items():
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"invalid header name {name!r}")
            if name.lower() in _HEADERS_OWN:
                raise ValueError(f"header {name!r} is set by the sidecar (a key goes in 'api_key')")
            if not _HEADER_VALUE.fullmatch(value):
                raise ValueError(f"the value of header {name!r} holds a control character or one outside ASCII")
        return headers

    def upstream_headers(self) -> dict[str, str]:
        """What every request to the engine carries on top of the client's: the key and the extra headers."""
        headers = {name.lower(): value for name, value in self.headers.items()}
        if self.api_key is not None:
            headers["authorization"] = f"Bearer {self.api_key.get_secret_value()}"
        return headers

    def secrets(self) -> list[str]:
        """Values masked in every log line once the engine is loaded: the environment's, the key, the headers'."""
        key = [self.api_key.get_secret_value()] if self.api_key is not None else []
        return [*self.env.values(), *key, *self.headers.values()]


class UnloadRequest(BaseModel):
    """POST /v1/model/unload: how long requests in flight may take to finish (default SIDECAR_DRAIN_TIMEOUT_S)."""

    model_config = ConfigDict(extra="forbid")

    drain_timeout_s: float | None = Field(None, ge=0, strict=True, allow_inf_nan=False)


class WakeRequest(BaseModel):
    """POST /v1/model/wake: no fields; one given (vLLM's `tags`, to wake a part) is refused, not ignored, since
    the sidecar wakes the whole engine."""

    model_config = ConfigDict(extra="forbid")


class SleepRequest(BaseModel):
    """POST /v1/model/sleep: the engine's sleep level (vLLM: 1 keeps the weights in CPU memory, 2 drops them)."""

    model_config = ConfigDict(extra="forbid")

    level: int = Field(1, ge=1, strict=True)


class AdapterRequest(BaseModel):
    """POST /v1/model/adapters/load: a LoRA adapter's name (what clients send as `model`) and its path."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@+=\-]*$")  # clients send it
    path: str = Field(min_length=1, max_length=4096, pattern=PRINTABLE)


class AdapterName(BaseModel):
    """POST /v1/model/adapters/unload."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=256, pattern=PRINTABLE)


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
    upstream_headers: dict[str, str] = field(default_factory=dict)  # on every request to the engine
    # What the redactor masks for this engine (its load request's values, its start's key), registered before it
    # starts and forgotten once it is let go: its output ended, or for an external one, unloaded.
    masked: tuple[str, ...] = ()

    @property
    def served_model(self) -> str:
        return self.request.served_model_name or self.request.model

    @functools.cached_property
    def assembles(self) -> bool:
        """Whether its non-streaming answers may be assembled from its stream (`EngineAdapter.assembles`)."""
        return self.adapter.assembles(self.request.args)


class EngineSlot:
    """One data-plane request's hold on the engine (`async with`, which gives the engine): `hold` counts it and
    returns the engine, or raises; `release` uncounts it. A class, not `@asynccontextmanager`, whose generator
    costs 2.3 µs a request against 0.5: the Supervisor's and a worker's `request_slot`."""

    __slots__ = ("_hold", "_release")

    def __init__(self, hold: Callable[[], Awaitable[Engine]], release: Callable[[], None]) -> None:
        self._hold = hold
        self._release = release

    async def __aenter__(self) -> Engine:
        return await self._hold()

    async def __aexit__(self, *exc_info: object) -> None:
        self._release()


def free_port() -> int:
    """A loopback port free now, for a server about to bind it: taken outside the kernel's ephemeral range, which
    outgoing connections take their source ports from. A port from that range can be taken meanwhile by any
    connection on the machine, the readiness probe's own included (a connection to a port nobody listens on yet
    can connect to itself), and the engine's bind then fails. The kernel's own choice where there is no room."""
    for port in _ports_to_try(_ephemeral_range()):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        chosen: int = sock.getsockname()[1]
        return chosen


def _ephemeral_range() -> tuple[int, int] | None:
    try:
        low, high = Path(_EPHEMERAL_RANGE_FILE).read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):  # not Linux
        return None


def _ports_to_try(ephemeral: tuple[int, int] | None) -> list[int]:
    """Up to `_PORT_TRIES` ports at random from `_LOWEST_PORT` up and outside the ephemeral range."""
    if ephemeral is None:
        return []
    low, high = ephemeral
    outside = [*range(_LOWEST_PORT, low), *range(high + 1, 65536)]
    return random.sample(outside, min(len(outside), _PORT_TRIES))
