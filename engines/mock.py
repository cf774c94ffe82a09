from __future__ import annotations

import sys
from collections.abc import Mapping

from engines.base import ArgValue, EngineAdapter
from engines.vllm import VLLM_LOAD


class MockAdapter(EngineAdapter):
    """The project's own OpenAI-compatible mock engine (`python -m engines.mock_server`), as a process."""

    name = "mock"
    default_executable = sys.executable
    list_style = "repeat"
    reserved_flags = frozenset({"host", "port", "model"})
    load_series = VLLM_LOAD  # its /metrics is shaped as vLLM's

    def command(self, model: str, port: int, args: Mapping[str, ArgValue], served_model_name: str | None) -> list[str]:
        argv = [self.executable, "-m", "engines.mock_server", "--model", served_model_name or model]
        return argv + ["--host", "127.0.0.1", "--port", str(port), *self.flags(args)]
