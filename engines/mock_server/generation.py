"""Deterministic output for the mock engine: the same request always gets the same tokens."""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from typing import Any

WORDS = (
    "the quick brown fox jumps over a lazy dog while seven tiny robots measure every token "
    "with careful clocks and report latency to an orchestrator far away"
).split()


def prompt_text(body: dict[str, Any]) -> str:
    if "messages" in body:
        parts = []
        for message in body.get("messages") or []:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list):
                content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            parts.append(str(content or ""))
        return "\n".join(parts)
    prompt = body.get("prompt", "")
    return " ".join(map(str, prompt)) if isinstance(prompt, list) else str(prompt)


def count_prompt_tokens(body: dict[str, Any]) -> int:
    return max(1, len(prompt_text(body).split()))


@dataclass(frozen=True)
class Token:
    text: str
    logprob: float
    top: list[tuple[str, float]]


def tokens_for(body: dict[str, Any], choice: int, count: int, top_k: int) -> list[Token]:
    seed = zlib.crc32(prompt_text(body).encode()) + 7 * choice
    tokens = []
    for i in range(count):
        word = WORDS[(seed + i) % len(WORDS)] + " "
        logprob = -round(0.05 + 0.1 * ((seed + i) % 7), 4)
        top = [(WORDS[(seed + i + k) % len(WORDS)] + " ", logprob - 0.5 * k) for k in range(top_k)]
        tokens.append(Token(word, logprob, top))
    return tokens


def tool_call_pieces(body: dict[str, Any], tokens: list[Token]) -> tuple[str, list[str]] | None:
    """The function the mock calls and its JSON arguments in pieces (one per token), or None for text output."""
    tools = body.get("tools") or []
    choice = body.get("tool_choice", "auto")
    if not tools or choice == "none":
        return None
    if isinstance(choice, dict):
        name = str(choice.get("function", {}).get("name", ""))
    else:
        name = str(tools[0].get("function", {}).get("name", "tool"))
    arguments = json.dumps({"query": "".join(t.text for t in tokens).strip()})
    size = max(1, -(-len(arguments) // max(1, len(tokens))))
    return name, [arguments[i : i + size] for i in range(0, len(arguments), size)]


def chat_logprobs(tokens: list[Token]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": t.text,
                "logprob": t.logprob,
                "bytes": list(t.text.encode()),
                "top_logprobs": [{"token": w, "logprob": lp, "bytes": list(w.encode())} for w, lp in t.top],
            }
            for t in tokens
        ]
    }


def prompt_logprobs(body: dict[str, Any]) -> list[dict[str, Any] | None]:
    """vLLM's `prompt_logprobs` of a whole answer: none for the first prompt token, one entry for each other."""
    words = prompt_text(body).split() or [""]
    return [None, *({str(i): {"logprob": -i / 10, "rank": 1, "decoded_token": w}} for i, w in enumerate(words[1:], 1))]


def completion_logprobs(tokens: list[Token], offset: int = 0) -> dict[str, Any]:
    offsets, position = [], offset
    for t in tokens:
        offsets.append(position)
        position += len(t.text)
    return {
        "tokens": [t.text for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [dict(t.top) for t in tokens],
        "text_offset": offsets,
    }


def embedding(text: str, dimensions: int = 8) -> list[float]:
    seed = zlib.crc32(text.encode())
    return [round(((seed >> (i * 3)) % 1000) / 1000 - 0.5, 6) for i in range(dimensions)]
