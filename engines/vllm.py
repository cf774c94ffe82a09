from __future__ import annotations

from collections.abc import Mapping

from engines.base import ArgValue, EngineAdapter


class VllmAdapter(EngineAdapter):
    """`vllm serve MODEL --host 127.0.0.1 --port P ...`. Its /health only reports an error flag: /v1/models too."""

    name = "vllm"
    default_executable = "vllm"
    reserved_flags = frozenset({"host", "port", "model"})

    def command(self, model: str, port: int, args: Mapping[str, ArgValue], served_model_name: str | None) -> list[str]:
        argv = [self.executable, "serve", model, "--host", "127.0.0.1", "--port", str(port)]
        if served_model_name:
            argv += ["--served-model-name", served_model_name]
        return argv + self.flags(args)
