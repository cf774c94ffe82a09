from __future__ import annotations

import sys
from collections.abc import Mapping

from engines.base import ArgValue
from engines.vllm import VLLM_DATA_PATHS, VLLM_LOAD, VllmFeatures


class MockAdapter(VllmFeatures):
    """The project's own OpenAI-compatible mock engine (`python -m engines.mock_server`), as a process. It plays
    vLLM's part where tests need one: its /metrics, its sleep mode and its LoRA endpoints, behind the same flags
    and variables."""

    name = "mock"
    default_executable = sys.executable
    list_style = "repeat"
    reserved_flags = frozenset({"host", "port", "model", "api-key"})
    key_env = "VLLM_API_KEY"  # as vLLM, it guards its /v1 paths with it
    load_series = VLLM_LOAD  # its /metrics is shaped as vLLM's
    data_paths = (*VLLM_DATA_PATHS, "* /v1/mock/echo")  # its echo of what reached it, for the tests

    def command(self, model: str, port: int, args: Mapping[str, ArgValue], served_model_name: str | None) -> list[str]:
        argv = [self.executable, "-m", "engines.mock_server", "--model", served_model_name or model]
        return argv + ["--host", "127.0.0.1", "--port", str(port), *self.flags(args)]
