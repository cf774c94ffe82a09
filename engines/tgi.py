from __future__ import annotations

from collections.abc import Mapping

from engines.base import ArgValue, EngineAdapter


class TgiAdapter(EngineAdapter):
    """`text-generation-launcher --model-id MODEL --hostname 127.0.0.1 --port P ...` (clap: lists repeat the flag)."""

    name = "tgi"
    default_executable = "text-generation-launcher"
    list_style = "repeat"
    reserved_flags = frozenset({"hostname", "port", "model-id"})

    def command(self, model: str, port: int, args: Mapping[str, ArgValue], served_model_name: str | None) -> list[str]:
        argv = [self.executable, "--model-id", model, "--hostname", "127.0.0.1", "--port", str(port)]
        if served_model_name:
            argv += ["--served-model-name", served_model_name]
        return argv + self.flags(args)
