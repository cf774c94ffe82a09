from __future__ import annotations

from collections.abc import Mapping

import httpx

from engines.base import EngineAdapter


class ExternalAdapter(EngineAdapter):
    """No process: an OpenAI-compatible server already running at the load request's `url`. Unload forgets it."""

    name = "external"
    starts_process = False

    async def is_ready(self, client: httpx.AsyncClient, base_url: str, headers: Mapping[str, str]) -> bool:
        for path in ("/health", "/v1/models"):
            try:
                if (await client.get(base_url + path, headers=headers)).status_code == 200:
                    return True
            except httpx.HTTPError:
                return False
        return False
