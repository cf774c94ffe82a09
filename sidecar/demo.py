"""`sidecar demo`: the main job end to end, in one command.

It starts the sidecar with an engine loaded (the mock engine by default, which needs no GPU), streams one chat
completion through it over HTTP as any client would, writes the answer and its `usage.performance` to stdout,
and stops the sidecar and the engine again.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import httpx
import uvloop

from sidecar.logs import get_logger
from sidecar.redaction import Redactor
from sidecar.server.serving import server as make_server
from sidecar.settings import Settings

log = get_logger("sidecar.demo")


async def _wait_ready(client: httpx.AsyncClient, serving: asyncio.Task[None], timeout_s: float) -> str:
    """The served model's name, once the engine is ready."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if serving.done():
            raise RuntimeError("the sidecar stopped during start-up: see the log above")
        try:
            ready = await client.get("/ready")
            if ready.status_code == 200:
                return str(ready.json()["engine"]["served_model_name"])
            if (await client.get("/health")).json()["engine"]["state"] == "failed":
                raise RuntimeError("the engine failed to start: see the log above")
        except httpx.TransportError:
            pass  # not listening yet
        await asyncio.sleep(0.1)
    raise TimeoutError(f"the engine was not ready within {timeout_s} s")


async def _stream_chat(client: httpx.AsyncClient, model: str, prompt: str) -> dict[str, Any]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    performance: dict[str, Any] = {}
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"the sidecar answered {response.status_code}: {(await response.aread()).decode()}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            for choice in chunk.get("choices") or ():
                sys.stdout.write((choice.get("delta") or {}).get("content") or "")
                sys.stdout.flush()
            if chunk.get("usage"):
                performance = chunk["usage"].get("performance", {})
    return performance


async def _demo(settings: Settings, redactor: Redactor, prompt: str) -> int:
    server = make_server(settings, redactor)
    serving = asyncio.create_task(server.serve())
    headers = {"Authorization": f"Bearer {settings.data_keys[0]}"} if settings.data_keys else {}
    url = f"http://{settings.host}:{settings.port}"
    try:
        async with httpx.AsyncClient(
            base_url=url, headers=headers, timeout=settings.upstream_first_token_timeout_s
        ) as c:
            model = await _wait_ready(c, serving, settings.startup_timeout_s)
            sys.stdout.write(f"POST {url}/v1/chat/completions (model {model}, streamed, include_usage): {prompt}\n\n")
            performance = await _stream_chat(c, model, prompt)
        sys.stdout.write("\n\nusage.performance:\n" + json.dumps(performance, indent=2) + "\n")
        return 0
    except (RuntimeError, TimeoutError, httpx.HTTPError) as exc:
        log.error("demo_failed", error=str(exc))
        return 1
    finally:
        server.should_exit = True
        await serving  # the lifespan's shutdown stops the engine: nothing is left running


def demo(settings: Settings, redactor: Redactor, prompt: str) -> int:
    """The demo, logging configured by the caller (`redactor` masks what it logs)."""
    return uvloop.run(_demo(settings, redactor, prompt))
