from __future__ import annotations

import sys
from collections.abc import Mapping

from engines.base import ArgValue, EngineAdapter, LoadSeries, LoraApi, flag_on, names_flag

SGLANG_LOAD = LoadSeries(
    queued=("sglang:num_queue_reqs",), running=("sglang:num_running_reqs",), kv_cache_usage=("sglang:token_usage",)
)
# Started with --enable-lora, it loads and unloads adapters at run time and lists them in /v1/models.
SGLANG_LORA = LoraApi(load="/load_lora_adapter", unload="/unload_lora_adapter")


class SglangAdapter(EngineAdapter):
    """`python -m sglang.launch_server --model-path MODEL --host 127.0.0.1 --port P ...` (with `--enable-metrics`,
    which its /metrics needs, unless the request's args say otherwise)."""

    name = "sglang"
    default_executable = sys.executable
    reserved_flags = frozenset({"host", "port", "model-path", "model"})
    load_series = SGLANG_LOAD

    def command(self, model: str, port: int, args: Mapping[str, ArgValue], served_model_name: str | None) -> list[str]:
        argv = [self.executable, "-m", "sglang.launch_server", "--model-path", model]
        argv += ["--host", "127.0.0.1", "--port", str(port)]
        if served_model_name:
            argv += ["--served-model-name", served_model_name]
        if not names_flag(args, "enable-metrics"):
            argv.append("--enable-metrics")
        return argv + self.flags(args)

    def lora_api(self, args: Mapping[str, ArgValue]) -> LoraApi | None:
        return SGLANG_LORA if flag_on(args, "enable-lora") else None
