"""Settings: one frozen object built once from `SIDECAR_*` variables and `.env`, then passed down."""

from __future__ import annotations

import ipaddress
import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, FilePath, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "SIDECAR_"
MAX_AUTO_WORKERS = 16

CommaList = Annotated[list[str], NoDecode]
KeyList = Annotated[list[SecretStr], NoDecode]


def _split_commas(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def usable_cores(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The cores this process may use: its CPU affinity, capped by its cgroup's CPU quota where one is set (a
    container limited to 2 CPUs on a 64-core node sees 64 in its affinity)."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]  # cgroup v2: "max 100000" or "200000 100000"
    except (OSError, ValueError):
        try:  # cgroup v1
            quota = (cgroup / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (cgroup / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return cores
    if quota in ("max", "-1") or not quota.lstrip("-").isdigit() or not period.isdigit() or int(period) <= 0:
        return cores
    return max(1, min(cores, math.ceil(int(quota) / int(period))))


def auto_workers(cores: int) -> int:
    """The data-plane workers for this many usable cores: half of them, the other half left to the engine's own
    processes on the CPU (vLLM's API server and engine core, a tokenizer), the load's clients where they share the
    machine, and the supervisor; at least one, at most `MAX_AUTO_WORKERS`. On 2 cores that is one: a second worker
    there relayed no more and spent more CPU a chunk (docs/data-plane.md#data-plane-workers)."""
    return max(1, min(cores // 2, MAX_AUTO_WORKERS))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
    )

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # Processes serving the data plane on the port (`auto`, the default: half the cores this process may use, its
    # cgroup's CPU quota included, at least 1 and at most 16); one more process owns the engine.
    workers: int = Field(default_factory=lambda: auto_workers(usable_cores()), ge=1, le=64)
    api_keys: KeyList = []
    admin_keys: KeyList = []
    metrics_require_key: bool = False

    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    log_format: Literal["console", "json"] = "console"
    log_dir: Path | None = None
    log_file_max_bytes: int = Field(50 * 1024 * 1024, gt=0)
    log_file_backups: int = Field(5, ge=0)
    # The engine's output lines logged a second at most, ten seconds' worth at once (0: every line); past it they
    # are counted, and kept in the output's tail and its live follow.
    engine_output_lines_per_s: int = Field(1000, ge=0)

    cors_origins: CommaList = []
    max_body_bytes: int = Field(16 * 1024 * 1024, gt=0)
    # Bytes of request bodies held at once (each is held while its request is handled): past it, 503 with
    # Retry-After before a body is read (0: no limit). With data-plane workers, each holds its share.
    max_body_bytes_in_flight: int = Field(1024 * 1024 * 1024, ge=0)
    max_header_bytes: int = Field(64 * 1024, ge=1024)
    client_timeout_s: float = Field(60.0, gt=0)

    # The most of one engine answer the sidecar holds: a non-streamed answer (it adds usage.performance), one event
    # of a relayed stream, or a stream it assembles. Past it, 502: an engine's answer is untrusted input too.
    max_answer_bytes: int = Field(256 * 1024 * 1024, gt=0)

    upstream_connect_timeout_s: float = Field(5.0, gt=0)
    upstream_first_token_timeout_s: float = Field(600.0, gt=0)
    upstream_inter_token_timeout_s: float = Field(120.0, gt=0)
    # CAs (PEM) trusted for https engines on top of the system's: a private CA's, or a self-signed engine's.
    upstream_ca_file: FilePath | None = None
    # Non-streaming requests are streamed from the engine and assembled, so that they get a TTFT too.
    assemble_non_streaming: bool = True
    request_history_size: int = Field(1000, ge=1)
    # Admission control: at most this many generation requests at the engine (0: no limit); beyond it they wait
    # in a queue of this length, this long at most; then 429.
    max_concurrent_requests: int = Field(0, ge=0)
    max_queued_requests: int = Field(256, ge=0)
    queue_timeout_s: float = Field(30.0, gt=0)
    startup_timeout_s: float = Field(900.0, gt=0)
    drain_timeout_s: float = Field(30.0, ge=0)
    # Idle unload: an engine without a request for this long is unloaded (0: never; a load's `ttl_s` wins).
    default_ttl_s: float = Field(0.0, ge=0)
    # After an idle unload, the next data-plane request loads the same model again and waits for it.
    load_on_demand: bool = False
    kill_grace_s: float = Field(10.0, ge=0)
    restart_max: int = Field(0, ge=0)
    restart_backoff_s: float = Field(1.0, gt=0)
    restart_backoff_max_s: float = Field(60.0, gt=0)
    watchdog_interval_ms: int = Field(100, ge=10)
    # OpenTelemetry (sidecar/telemetry/otel.py): requests as GenAI spans and metrics, sent to this OTLP/HTTP base URL (a
    # collector's http://host:4318). Off while neither it nor the SDK's OTEL_EXPORTER_OTLP_*ENDPOINT is set.
    otel_exporter_otlp_endpoint: str | None = None
    # The record of the running engine lives here, so that the next sidecar stops one a killed sidecar left behind.
    run_dir: Path = Path("/tmp/sidecar")

    # The executable for an engine, where it is not the adapter's default on PATH: {"vllm": "/opt/vllm/bin/vllm"}.
    engine_executables: dict[str, str] = {}
    # An engine to load at start-up (for compose): the load request's fields.
    autoload_engine: str | None = None
    autoload_model: str | None = None
    autoload_args: dict[str, Any] = {}
    autoload_served_model_name: str | None = None

    @field_validator("api_keys", "admin_keys", "cors_origins", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        return _split_commas(value)

    @field_validator(
        "log_dir",
        "upstream_ca_file",
        "autoload_engine",
        "autoload_model",
        "autoload_served_model_name",
        "otel_exporter_otlp_endpoint",
        mode="before",
    )
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("workers", mode="before")
    @classmethod
    def _auto_workers(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return auto_workers(usable_cores())
        return value

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lowercase(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _autoload_needs_a_model(self) -> Settings:
        if self.autoload_engine and not self.autoload_model:
            raise ValueError(f"{ENV_PREFIX}AUTOLOAD_MODEL: needed with {ENV_PREFIX}AUTOLOAD_ENGINE")
        return self

    @model_validator(mode="after")
    def _room_for_one_body(self) -> Settings:
        if 0 < self.max_body_bytes_in_flight < self.max_body_bytes:
            raise ValueError(
                f"{ENV_PREFIX}MAX_BODY_BYTES_IN_FLIGHT: at least {ENV_PREFIX}MAX_BODY_BYTES ({self.max_body_bytes}), "
                "or 0 for no limit"
            )
        return self

    @model_validator(mode="after")
    def _no_public_listen_without_keys(self) -> Settings:
        if not self.has_keys and not is_loopback(self.host):
            raise ValueError(
                f"{ENV_PREFIX}HOST: refusing to listen on {self.host} without keys: set {ENV_PREFIX}API_KEYS "
                f"(or {ENV_PREFIX}ADMIN_KEYS), or listen on 127.0.0.1"
            )
        return self

    @property
    def has_keys(self) -> bool:
        return bool(self.api_keys or self.admin_keys)

    @property
    def data_keys(self) -> list[str]:
        """Keys accepted on the data plane: the data keys, and the admin keys, which can do everything."""
        return [k.get_secret_value() for k in (*self.api_keys, *self.admin_keys)]

    @property
    def control_keys(self) -> list[str]:
        """Keys accepted on the control plane: the admin keys, or the data keys when none are set."""
        return [k.get_secret_value() for k in (self.admin_keys or self.api_keys)]


class SettingsError(Exception):
    """Settings that cannot be used; the message is one line naming the setting(s)."""


def load_settings(env_file: str | Path | None = ".env", **overrides: Any) -> Settings:
    try:
        return Settings(_env_file=env_file, **overrides)
    except ValidationError as exc:
        raise SettingsError(describe_validation_error(exc)) from None


def describe_validation_error(exc: ValidationError) -> str:
    """One line naming each bad setting, never echoing its value (it may be a key)."""
    parts = []
    for error in exc.errors(include_input=False, include_url=False):
        name = ".".join(str(p) for p in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        parts.append(f"{ENV_PREFIX}{name.upper()}: {message}" if name else message)
    return "invalid setting " + "; ".join(parts)
