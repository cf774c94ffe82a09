"""The orchestrator of the compose pair: what any orchestrator does with a model container.

It waits for the sidecar, loads the model through the control plane with the admin key (unless the container
has it loaded already, by autoload), streams one chat request with the api key, and logs the answer with the
sidecar's `usage.performance`, one JSON line per event, as the sidecar logs. It exits 0 when all of that worked.

Settings, from the environment (the compose pair's .env):
  SIDECAR_URL           the model container (http://model:8000)
  SIDECAR_ADMIN_KEYS    the first one loads the model (falls back to SIDECAR_API_KEYS, as the sidecar does)
  SIDECAR_API_KEYS      the first one sends the chat request
  ENGINE, MODEL         what to load: vllm, sglang, tgi, llamacpp or mock, and the model for it
  MODEL_ARGS            the engine's flags as JSON ({"max-model-len": 4096})
  LOAD_TIMEOUT_S        how long a load may take (900)
  PROMPT                the user message

Needs only httpx and structlog.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import httpx
import structlog

log = structlog.get_logger("orchestrator")


def first_key(*names: str) -> str:
    for name in names:
        keys = [key.strip() for key in os.environ.get(name, "").split(",") if key.strip()]
        if keys:
            return keys[0]
    raise SystemExit(f"set {' or '.join(names)}: the sidecar refuses requests without a key")


def wait_healthy(client: httpx.Client, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if client.get("/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"the sidecar did not answer /health within {timeout_s:.0f} s")
        time.sleep(1)


def load(client: httpx.Client, admin_key: str, engine: str, model: str, args: dict[str, Any], timeout_s: float) -> None:
    headers = {"Authorization": f"Bearer {admin_key}"}
    status = client.get("/v1/model", headers=headers).raise_for_status().json()
    if status["state"] == "ready" and model in (status.get("model"), status.get("served_model_name")):
        log.info("model_already_loaded", engine=status["engine"], model=model)
        return
    if status["state"] != "loading":
        body = {"engine": engine, "model": model, "args": args, "wait": True, "startup_timeout_s": timeout_s}
        # replace: whatever another run left loaded gives way to what this one asks for.
        response = client.post("/v1/model/load", json=body | {"replace": True}, headers=headers, timeout=timeout_s + 30)
        if response.status_code != 200:
            raise SystemExit(f"load failed with {response.status_code}: {response.text}")
        log.info("model_loaded", **{k: v for k, v in response.json().items() if k != "state"})
        return
    deadline = time.monotonic() + timeout_s  # an autoload is on its way: wait for it
    while client.get("/ready").status_code != 200:
        if time.monotonic() > deadline:
            raise SystemExit(f"the model was not ready within {timeout_s:.0f} s")
        time.sleep(2)
    log.info("model_loaded_by_autoload", model=model)


def chat(client: httpx.Client, api_key: str, model: str, prompt: str) -> dict[str, Any]:
    """One streamed chat request; its text, and the sidecar's metrics from the usage chunk."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 64,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    text: list[str] = []
    performance: dict[str, Any] = {}
    headers = {"Authorization": f"Bearer {api_key}"}
    with client.stream("POST", "/v1/chat/completions", json=body, headers=headers, timeout=300) as response:
        if response.status_code != 200:
            raise SystemExit(f"chat failed with {response.status_code}: {response.read().decode()}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if "error" in chunk:
                raise SystemExit(f"the stream ended with an error: {chunk['error']}")
            for choice in chunk.get("choices") or ():
                text.append((choice.get("delta") or {}).get("content") or "")
            if chunk.get("usage"):
                performance = chunk["usage"].get("performance") or {}
    return {"text": "".join(text), "performance": performance}


def main() -> int:
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.JSONRenderer(),
        ]
    )
    url = os.environ.get("SIDECAR_URL", "http://127.0.0.1:8000")
    engine = os.environ.get("ENGINE", "mock")
    model = os.environ.get("MODEL", "mock-model")
    args = json.loads(os.environ.get("MODEL_ARGS") or "{}")
    timeout_s = float(os.environ.get("LOAD_TIMEOUT_S", "900"))
    prompt = os.environ.get("PROMPT", "Why measure time to first token?")
    admin_key = first_key("SIDECAR_ADMIN_KEYS", "SIDECAR_API_KEYS")
    api_key = first_key("SIDECAR_API_KEYS")
    with httpx.Client(base_url=url, timeout=30) as client:
        wait_healthy(client, timeout_s=120)
        load(client, admin_key, engine, model, args, timeout_s)
        answer = chat(client, api_key, model, prompt)
    log.info("chat_answered", text=answer["text"], performance=answer["performance"])
    return 0 if answer["performance"] else 1


if __name__ == "__main__":
    sys.exit(main())
