from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

from engines.base import MODELS_PATHS, ArgValue, EngineAdapter, LoadSeries, LoraApi, names_flag

SGLANG_LOAD = LoadSeries(
    queued=("sglang:num_queue_reqs",), running=("sglang:num_running_reqs",), kv_cache_usage=("sglang:token_usage",)
)


class SglangAdapter(EngineAdapter):
    """`python -m sglang.launch_server --model-path MODEL --host 127.0.0.1 --port P ...` (with `--enable-metrics`,
    which its /metrics needs, unless the request's args say otherwise)."""

    name = "sglang"
    default_executable = sys.executable
    reserved_flags = frozenset({"host", "port", "model-path", "model"})
    served_name_flag = "served-model-name"
    key_flag = "api-key"  # no variable: it guards every path but /health (and /metrics) with it
    load_series = SGLANG_LOAD
    # Started with --enable-lora, it loads and unloads adapters at run time and lists them in /v1/models.
    dynamic_lora = LoraApi(flag="enable-lora", load="/load_lora_adapter", unload="/unload_lora_adapter")
    data_paths = (
        *MODELS_PATHS,
        "POST /v1/responses",
        "GET /v1/responses/*",
        "POST /v1/score",
        "POST /v1/rerank",
        "POST /v1/messages",  # Anthropic's Messages API: since 2026-02 (SGLang's pull request 18630)
        "POST /v1/messages/count_tokens",
    )

    def command(self, model: str, port: int, args: Mapping[str, ArgValue], served_model_name: str | None) -> list[str]:
        argv = [self.executable, "-m", "sglang.launch_server", "--model-path", model]
        argv += ["--host", "127.0.0.1", "--port", str(port)]
        if served_model_name:
            argv += ["--served-model-name", served_model_name]
        if not names_flag(args, "enable-metrics"):
            argv.append("--enable-metrics")
        return argv + self.flags(args)

    def translate_request(self, body: dict[str, Any]) -> dict[str, Any]:
        """A client's `rid` made unique, as the X-Request-ID every engine gets is. SGLang keys a request by the rid
        in its body, as the client wrote it, and two running under one rid crashed it (its detokenizer's KeyError,
        until sglang#19035 refused a second). The client's rid stays its prefix, for the engine's logs."""
        rid = body.get("rid")
        if isinstance(rid, str):
            return body | {"rid": f"{rid}-{os.urandom(8).hex()}"}
        if isinstance(rid, list):  # one for each prompt or choice: made unique among themselves too
            suffix = os.urandom(8).hex()
            unique = [f"{each}-{suffix}-{index}" if isinstance(each, str) else each for index, each in enumerate(rid)]
            return body | {"rid": unique}
        return body
