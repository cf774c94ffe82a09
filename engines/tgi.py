from __future__ import annotations

from collections.abc import Mapping

from engines.base import ArgValue, EngineAdapter, LoadSeries

TGI_LOAD = LoadSeries(queued=("tgi_queue_size",), running=("tgi_batch_current_size",))  # no KV cache series


class TgiAdapter(EngineAdapter):
    """`text-generation-launcher --model-id MODEL --hostname 127.0.0.1 --port P ...` (clap: lists repeat the flag)."""

    name = "tgi"
    default_executable = "text-generation-launcher"
    list_style = "repeat"
    reserved_flags = frozenset({"hostname", "port", "model-id", "api-key"})
    served_name_flag = "served-model-name"
    reserved_env = frozenset({"HOSTNAME", "PORT", "MODEL_ID"})  # its launcher's flags' variables
    # Its launcher's `--api-key` (releases that have it; older ones ignore the variable), which it passes on to its
    # router's command line.
    key_env = "API_KEY"
    load_series = TGI_LOAD

    def command(self, model: str, port: int, args: Mapping[str, ArgValue], served_model_name: str | None) -> list[str]:
        argv = [self.executable, "--model-id", model, "--hostname", "127.0.0.1", "--port", str(port)]
        if served_model_name:
            argv += ["--served-model-name", served_model_name]
        return argv + self.flags(args)
