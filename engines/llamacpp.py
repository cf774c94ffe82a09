from __future__ import annotations

import shutil
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engines.base import ArgValue, EngineAdapter, LoadSeries, names_flag, prompt_text

LLAMA_SERVER_LOAD = LoadSeries(
    queued=("llamacpp:requests_deferred",),
    running=("llamacpp:requests_processing",),
    kv_cache_usage=("llamacpp:kv_cache_usage_ratio",),
)


class LlamaCppAdapter(EngineAdapter):
    """llama.cpp's `llama-server -m MODEL --host 127.0.0.1 --port P ...` (ready when /health answers 200), with
    `--metrics`, which its /metrics needs, unless the request's args say otherwise."""

    name = "llamacpp"
    default_executable = "llama-server"
    ready_paths = ("/health",)
    list_style = "repeat"
    reserved_flags = frozenset({"host", "port", "m", "model", "api-key"})
    served_name_flag = "alias"
    # Its flags' variables: the address, the model, the served name.
    reserved_env = frozenset({"LLAMA_ARG_HOST", "LLAMA_ARG_PORT", "LLAMA_ARG_MODEL", "LLAMA_ARG_ALIAS"})
    key_env = "LLAMA_API_KEY"  # guards every path but /health (older builds: /models and /v1/models too)
    load_series = LLAMA_SERVER_LOAD
    # Anthropic's Messages API: since 2025-11 (llama.cpp's pull request 17570).
    data_paths = ("GET /v1/models", "POST /v1/rerank", "POST /v1/messages", "POST /v1/messages/count_tokens")
    whole_message = "as_streamed"

    def command(self, model: str, port: int, args: Mapping[str, ArgValue], served_model_name: str | None) -> list[str]:
        argv = [self.executable, "-m", model, "--host", "127.0.0.1", "--port", str(port)]
        if served_model_name:
            argv += ["--alias", served_model_name]
        if not names_flag(args, "metrics"):
            argv.append("--metrics")
        return argv + self.flags(args)


class LlamaCppPythonAdapter(EngineAdapter):
    """llama-cpp-python's `python -m llama_cpp.server --model MODEL ...`.

    It has no /health (probe /v1/models), ignores `stream_options` (no usage chunk), and by default interrupts a
    running request when a new one arrives: it is started with `--interrupt_requests False`.
    """

    name = "llamacpp"
    default_executable = sys.executable
    ready_paths = ("/v1/models",)
    reserved_flags = frozenset({"host", "port", "model", "interrupt_requests", "api_key", "config_file"})
    served_name_flag = "model_alias"
    # Its server listens on $HOST and $PORT over its flags, and reads a whole configuration in their place from
    # $CONFIG_FILE (or --config_file).
    reserved_env = frozenset({"HOST", "PORT", "CONFIG_FILE"})
    key_env = "API_KEY"  # guards its every route
    streams_usage = False
    data_paths = ("GET /v1/models",)  # its other routes are /extras/*, and a Copilot completion route

    def environment(self, args: Mapping[str, ArgValue]) -> dict[str, str]:
        # Its server reports disconnects with print(): unbuffered, they reach the log when they happen.
        return {"PYTHONUNBUFFERED": "1"}

    def engine_request_id(self, request_id: str) -> str:
        # Its request-id middleware answers an empty 400 to an X-Request-ID that is not a UUID (`job-42-5f0c...`):
        # such an id is sent as the UUID it names, the client keeps its own.
        try:
            return uuid.UUID(request_id).hex
        except ValueError:
            return uuid.uuid5(uuid.NAMESPACE_URL, f"x-request-id:{request_id}").hex

    def translate_request(self, body: dict[str, Any]) -> dict[str, Any]:
        # It knows only `max_tokens`: `max_completion_tokens` (what current OpenAI clients send) would be ignored
        # and the answer would run to the context's end.
        if "max_completion_tokens" in body and "max_tokens" not in body:
            rest = {k: v for k, v in body.items() if k != "max_completion_tokens"}
            return rest | {"max_tokens": body["max_completion_tokens"]}
        return body

    def prompt_count_request(self, body: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
        # Its tokenizer, on the prompt's text: exact for a completion's prompt; for a chat, the messages' text
        # without the template's tokens (it has no endpoint that applies the template).
        text = prompt_text(body)
        return None if text is None else ("/extras/tokenize/count", {"input": text})

    def prompt_count(self, answer: Any) -> int | None:
        count = answer.get("count") if isinstance(answer, dict) else None
        return count if isinstance(count, int) and not isinstance(count, bool) else None

    def command(self, model: str, port: int, args: Mapping[str, ArgValue], served_model_name: str | None) -> list[str]:
        argv = [self.executable, "-m", "llama_cpp.server", "--model", model, "--host", "127.0.0.1", "--port", str(port)]
        argv += ["--interrupt_requests", "False"]
        if served_model_name:
            argv += ["--model_alias", served_model_name]
        return argv + self.flags(args)


def llamacpp(executable: str | None = None) -> EngineAdapter:
    """llama-server when it is on PATH (or configured), else llama-cpp-python's server.

    A configured executable named python* is the interpreter that has llama-cpp-python installed.
    """
    if executable and Path(executable).name.startswith("python"):
        return LlamaCppPythonAdapter(executable)
    if executable or shutil.which(LlamaCppAdapter.default_executable):
        return LlamaCppAdapter(executable)
    return LlamaCppPythonAdapter()
