"""What an engine adapter knows: how to start its engine, and when the engine is ready."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import httpx

ArgValue = str | int | float | bool | None | list[Any] | dict[str, Any]

_FLAG_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
# The one kind of value that may begin with "-": a number, which no engine's parser reads as a flag.
_NEGATIVE_NUMBER = re.compile(r"-(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


class AdapterError(ValueError):
    """A load request this adapter cannot turn into an engine (a bad flag, a missing field)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def _value(value: Any, raw_name: str) -> str:
    """A flag's value as one argument. One that begins with "-" (but a number) is refused: after a flag that takes
    no value, or past a list's values, the engine's parser reads it as a flag of its own, and `--host=0.0.0.0`
    there would override the sidecar's host whatever the flag names checked."""
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    if "\x00" in text:  # a command line's strings end at NUL: the engine would get part of the value
        raise AdapterError(f"the value of flag --{raw_name.lstrip('-')} holds a NUL character", f"args.{raw_name}")
    if text.startswith("-") and not _NEGATIVE_NUMBER.fullmatch(text):
        raise AdapterError(
            f"the value {text!r} of flag --{raw_name.lstrip('-')} begins with '-': the engine would read it as a flag",
            param=f"args.{raw_name}",
        )
    return text


def _spelled(name: str) -> str:
    """A flag's name as vLLM's parser reads it: without its dashes, `_` and `-` one."""
    return name.lstrip("-").replace("_", "-")


def _reserved_by(name: str, reserved: frozenset[str]) -> str | None:
    """The reserved flag that `name` would set: the flag itself, or a prefix of it, which Python's argparse (vLLM's,
    SGLang's, llama-cpp-python's parser) takes for the whole flag; `_` and `-` are one (vLLM reads both)."""
    spelled = _spelled(name)
    return next((flag for flag in sorted(reserved) if _spelled(flag).startswith(spelled)), None)


def flags_from_args(
    args: Mapping[str, ArgValue],
    list_style: Literal["nargs", "repeat"] = "nargs",
    reserved: frozenset[str] = frozenset(),
) -> list[str]:
    """`{"max-model-len": 4096, "enforce-eager": true}` → `["--max-model-len", "4096", "--enforce-eager"]`.

    In the request's order. `true` is a bare flag, `false` and `null` leave the flag out, a list repeats the
    flag (`repeat`) or gives it several values (`nargs`), an object becomes JSON.
    """
    argv: list[str] = []
    for raw_name, value in args.items():
        name = raw_name.lstrip("-")
        if not _FLAG_NAME.fullmatch(name):
            raise AdapterError(f"invalid flag name {raw_name!r}", param=f"args.{raw_name}")
        taken = _reserved_by(name, reserved)
        if taken is not None:
            message = f"flag --{name} is set by the sidecar (--{taken}) and cannot be passed in args"
            raise AdapterError(message, f"args.{raw_name}")
        flag = f"--{name}"
        if value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, list):
            if list_style == "repeat":
                for item in value:
                    argv += [flag, _value(item, raw_name)]
            else:
                argv += [flag, *(_value(item, raw_name) for item in value)]
        else:
            argv += [flag, _value(value, raw_name)]
    return argv


def names_flag(args: Mapping[str, ArgValue], name: str) -> bool:
    """Whether the request's args set flag `name` (written with or without its dashes, `_` for `-`), to any value."""
    return any(_spelled(key) == _spelled(name) for key in args)


def flag_on(args: Mapping[str, ArgValue], name: str) -> bool:
    """Whether the request's args turn flag `name` on: named (as `names_flag` reads names), and not `false` or null
    (which leave it out)."""
    return any(
        _spelled(key) == _spelled(name) and value is not False and value is not None for key, value in args.items()
    )


# Every engine's model list, and one model's entry (GET /v1/models/{id}).
MODELS_PATHS = ("GET /v1/models", "GET /v1/models/*")


def serves(data_paths: tuple[str, ...], method: str, path: str) -> bool:
    """Whether `method path` is one of `data_paths` (see `EngineAdapter.data_paths`)."""
    for entry in data_paths:
        allowed_method, _, pattern = entry.partition(" ")
        if allowed_method in (method, "*") and _matches(pattern, path):
            return True
    return False


def methods_served(data_paths: tuple[str, ...], path: str) -> list[str]:
    """The methods `data_paths` lets through on `path`, sorted ("*": any), HEAD with GET (the sidecar serves a
    HEAD as the engine's GET without its body)."""
    entries = (entry.partition(" ") for entry in data_paths)
    methods = {method for method, _, pattern in entries if _matches(pattern, path)}
    return sorted(methods | {"HEAD"} if "GET" in methods else methods)


def _matches(pattern: str, path: str) -> bool:
    if pattern.endswith("*"):
        return path.startswith(pattern[:-1]) and len(path) > len(pattern) - 1
    return path == pattern


@dataclass(frozen=True)
class SleepApi:
    """An engine's sleep mode, there when it is started with `flag`: POST `sleep?level=N` frees its GPU memory
    (weights and KV cache), POST `wake` takes it back; the process keeps running."""

    flag: str
    sleep: str
    wake: str
    levels: tuple[int, ...] = (1, 2)


@dataclass(frozen=True)
class LoraApi:
    """An engine's dynamic LoRA, there when it is started with `flag`: POST {"lora_name", "lora_path"} to `load`,
    {"lora_name"} to `unload`; the adapters it has are the entries of its /v1/models that name a `parent`."""

    flag: str
    load: str
    unload: str


@dataclass(frozen=True)
class LoadSeries:
    """Where an engine's own Prometheus text says how loaded it is: the series' names, first found wins."""

    queued: tuple[str, ...]  # requests waiting to be scheduled
    running: tuple[str, ...]  # requests being generated
    kv_cache_usage: tuple[str, ...] = ()  # the KV cache's used fraction, 0 to 1


def prompt_text(body: Mapping[str, Any]) -> str | None:
    """The text of a generation request's prompt: a completion's prompt, or the text of a chat's messages (without
    the chat template's own tokens, which only the engine knows). None where the prompt is not text."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(item, str) for item in prompt):
        return "\n".join(prompt)
    messages = body.get("messages")
    if not isinstance(messages, list):
        return None
    texts: list[str] = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):  # parts: {"type": "text", "text": ...}
            texts += [part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)]
    return "\n".join(texts)


class EngineAdapter:
    """One engine. Subclasses set the class attributes and build the command line."""

    name: ClassVar[str]
    default_executable: ClassVar[str] = ""
    # Every path must answer 200 before the engine counts as ready.
    ready_paths: ClassVar[tuple[str, ...]] = ("/health", "/v1/models")
    list_style: ClassVar[Literal["nargs", "repeat"]] = "nargs"
    # Flags the adapter sets itself (host, port, model): a request may not pass them.
    reserved_flags: ClassVar[frozenset[str]] = frozenset({"host", "port"})
    # Variables the engine reads for what those flags set (the address it listens on, its whole configuration): a
    # request's `env` may not set them either.
    reserved_env: ClassVar[frozenset[str]] = frozenset()
    # The variable the engine reads an API key from. The sidecar puts a new random key there at each start and sends
    # it with every request: the engine's loopback port, which every process sharing the network namespace reaches
    # (a pod's other containers), then answers its guarded paths to the sidecar alone. Reserved with
    # `reserved_env`; the flag that would replace it goes in `reserved_flags`. None: the engine takes no key that way.
    key_env: ClassVar[str | None] = None
    # For an engine that reads no variable for it: the flag it takes the key by, on its command line (which the
    # container's other processes can read, unlike its environment). Reserved with `reserved_flags`.
    key_flag: ClassVar[str | None] = None
    # The flag `command` names the model by when a load gives `served_model_name`. A request may not pass it in
    # `args`: the sidecar reports the served name (`GET /v1/model`, the metrics' `model` label), which would then
    # not be the name the engine answers to.
    served_name_flag: ClassVar[str | None] = None
    starts_process: ClassVar[bool] = True
    # The engine honours `stream_options.include_usage`. Where it does not, the sidecar counts the streamed tokens
    # itself (output events) and asks the engine to count the prompt (`prompt_count_request`), for streamed and
    # assembled answers alike.
    streams_usage: ClassVar[bool] = True
    # How the engine writes a whole Messages API answer, for one built from its stream to equal it: "omit_nulls"
    # (vLLM: a field with no value left out), "as_streamed" (llama-server: as its stream's events have them). None:
    # not known, so a non-streaming Messages request goes to it as it is, its TTFT unmeasured.
    whole_message: ClassVar[Literal["omit_nulls", "as_streamed"] | None] = None
    # The engine's own metrics: where it serves them, and which of its series are its load (none: not read).
    metrics_path: ClassVar[str] = "/metrics"
    load_series: ClassVar[LoadSeries | None] = None
    # Features the engine has when the load's args turn on their flag (none: it has none).
    sleep_mode: ClassVar[SleepApi | None] = None
    dynamic_lora: ClassVar[LoraApi | None] = None
    # The engine's other paths a data key reaches through the sidecar, beside chat, completions and embeddings
    # (the sidecar's own routes): `METHOD /path`, a trailing `*` for any rest (a model id may hold `/`). Every
    # other path of the engine (its admin endpoints: LoRA, sleep, cache, profiling) is 404 to clients.
    data_paths: ClassVar[tuple[str, ...]] = MODELS_PATHS

    def __init__(self, executable: str | None = None) -> None:
        self.executable = executable or self.default_executable

    @classmethod
    def serves(cls, method: str, path: str) -> bool:
        """Whether a client's `method path` may pass through to this engine (`data_paths`)."""
        return serves(cls.data_paths, method, path)

    @classmethod
    def methods_served(cls, path: str) -> list[str]:
        """The methods a client's request on `path` may pass through to this engine with (`data_paths`)."""
        return methods_served(cls.data_paths, path)

    def command(self, model: str, port: int, args: Mapping[str, ArgValue], served_model_name: str | None) -> list[str]:
        raise NotImplementedError

    def assembles(self, args: Mapping[str, ArgValue]) -> bool:
        """Whether a non-streaming chat or completion may be streamed from the engine that `args` start and answered
        assembled (for its TTFT): only where the answer built from its stream is the one it gives whole. Not where
        it streams no usage: counted instead, the answer's usage would not be the engine's own."""
        return self.streams_usage

    def flags(self, args: Mapping[str, ArgValue]) -> list[str]:
        reserved = self.reserved_flags if self.key_flag is None else self.reserved_flags | {self.key_flag}
        argv = flags_from_args(args, self.list_style, reserved)
        if self.served_name_flag is not None:
            for raw_name in args:
                if _reserved_by(raw_name, frozenset({self.served_name_flag})) is not None:
                    message = f"flag --{self.served_name_flag} names the model: give the load's served_model_name"
                    raise AdapterError(message, f"args.{raw_name}")
        return argv

    def check_env(self, env: Mapping[str, str]) -> None:
        """A load's `env` without the variables the sidecar sets (`reserved_env`, `key_env`), else AdapterError."""
        reserved = self.reserved_env if self.key_env is None else self.reserved_env | {self.key_env}
        taken = [name for name in env if name.upper() in reserved]
        if taken:
            named = ", ".join(map(repr, taken))
            raise AdapterError(f"{named}: set by the sidecar for {self.name} (its address, its model, its key)", "env")

    def engine_request_id(self, request_id: str) -> str:
        """The X-Request-ID the engine gets for the client's (or the sidecar's) request id: as it is by default
        (vLLM puts it in its own request id, which ties its logs to ours)."""
        return request_id

    def translate_request(self, body: dict[str, Any]) -> dict[str, Any]:
        """The request body in the engine's terms, where it names a field differently; the same object if not."""
        return body

    def prompt_count_request(self, body: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
        """For an engine that streams no usage: the request (path, JSON body) that counts the prompt's tokens with
        the engine's own tokenizer; None where it has no such endpoint (the prompt's count is then unknown)."""
        return None

    def prompt_count(self, answer: Any) -> int | None:
        """The count in the engine's answer to `prompt_count_request`."""
        return None

    def environment(self, args: Mapping[str, ArgValue]) -> dict[str, str]:
        """Variables the engine needs on top of the sidecar's environment and the request's `env`."""
        return {}

    def sleep_api(self, args: Mapping[str, ArgValue]) -> SleepApi | None:
        """The engine's sleep mode, where the engine started with these args has one."""
        mode = self.sleep_mode
        return mode if mode is not None and flag_on(args, mode.flag) else None

    def lora_api(self, args: Mapping[str, ArgValue]) -> LoraApi | None:
        """The engine's dynamic LoRA adapters, where the engine started with these args has them."""
        lora = self.dynamic_lora
        return lora if lora is not None and flag_on(args, lora.flag) else None

    async def is_ready(self, client: httpx.AsyncClient, base_url: str, headers: Mapping[str, str]) -> bool:
        for path in self.ready_paths:
            try:
                response = await client.get(base_url + path, headers=headers)
            except httpx.HTTPError:
                return False
            if response.status_code != 200:
                return False
        return True
