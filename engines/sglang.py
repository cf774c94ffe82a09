from __future__ import annotations

import sys
from collections.abc import Mapping

from engines.base import ArgValue, EngineAdapter


class SglangAdapter(EngineAdapter):
    """`python -m sglang.launch_server --model-path MODEL --host 127.0.0.1 --port P ...`."""

    name = "sglang"
    default_executable = sys.executable
    reserved_flags = frozenset({"host", "port", "model-path", "model"})

    def command(self, model: str, port: int, args: Mapping[str, ArgValue], served_model_name: str | None) -> list[str]:
        argv = [self.executable, "-m", "sglang.launch_server", "--model-path", model]
        argv += ["--host", "127.0.0.1", "--port", str(port)]
        if served_model_name:
            argv += ["--served-model-name", served_model_name]
        return argv + self.flags(args)
