from __future__ import annotations

from collections.abc import Mapping

import httpx

from engines.base import EngineAdapter, LoadSeries
from engines.llamacpp import LLAMA_SERVER_LOAD, LlamaCppAdapter
from engines.sglang import SGLANG_LOAD, SglangAdapter
from engines.tgi import TGI_LOAD
from engines.vllm import VLLM_DATA_PATHS, VLLM_LOAD

# Whichever engine it is, its own names say how loaded it is.
_KNOWN = (VLLM_LOAD, SGLANG_LOAD, LLAMA_SERVER_LOAD, TGI_LOAD)
ANY_ENGINE_LOAD = LoadSeries(
    queued=tuple(name for known in _KNOWN for name in known.queued),
    running=tuple(name for known in _KNOWN for name in known.running),
    kv_cache_usage=tuple(name for known in _KNOWN for name in known.kv_cache_usage),
)


class ExternalAdapter(EngineAdapter):
    """No process: an OpenAI-compatible server already running at the load request's `url`. Unload forgets it."""

    name = "external"
    starts_process = False
    load_series = ANY_ENGINE_LOAD
    # Whichever engine (or hosted API) it is: the data plane any of them serves.
    data_paths = tuple(dict.fromkeys([*VLLM_DATA_PATHS, *SglangAdapter.data_paths, *LlamaCppAdapter.data_paths]))

    async def is_ready(self, client: httpx.AsyncClient, base_url: str, headers: Mapping[str, str]) -> bool:
        for path in ("/health", "/v1/models"):
            try:
                if (await client.get(base_url + path, headers=headers)).status_code == 200:
                    return True
            except httpx.HTTPError:
                return False
        return False
