from __future__ import annotations

from collections.abc import Mapping

from engines.base import ArgValue, EngineAdapter, LoadSeries

# vLLM before 0.10 named the KV cache's use gpu_cache_usage_perc; both are fractions, 0 to 1.
VLLM_LOAD = LoadSeries(
    queued=("vllm:num_requests_waiting",),
    running=("vllm:num_requests_running",),
    kv_cache_usage=("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
)


class VllmAdapter(EngineAdapter):
    """`vllm serve MODEL --host 127.0.0.1 --port P ...`. Its /health only reports an error flag: /v1/models too."""

    name = "vllm"
    default_executable = "vllm"
    reserved_flags = frozenset({"host", "port", "model"})
    load_series = VLLM_LOAD

    def command(self, model: str, port: int, args: Mapping[str, ArgValue], served_model_name: str | None) -> list[str]:
        argv = [self.executable, "serve", model, "--host", "127.0.0.1", "--port", str(port)]
        if served_model_name:
            argv += ["--served-model-name", served_model_name]
        return argv + self.flags(args)
