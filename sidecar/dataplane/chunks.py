"""What the proxy reads in the engine's streamed chunks, and how it builds a whole answer from them.

The hot path asks one question of every chunk: does it carry generated output? `has_output` answers it on
the raw bytes with a regex search or two, which costs a fraction of parsing the JSON; `carries_output` is
the same question on a parsed chunk, for the rarer paths that parse anyway (several choices, assembly).
"""

from __future__ import annotations

import re
from typing import Any

_OUTPUT_DELTA_FIELDS = ("content", "reasoning_content", "reasoning", "tool_calls", "function_call")

# A non-empty output string, a tool call, or a function call. Keys inside JSON strings are escaped (\"content\"),
# so text that merely mentions these names does not match.
_OUTPUT = re.compile(
    rb'"(?:content|text|reasoning_content|reasoning)"\s*:\s*"(?!")'
    rb'|"tool_calls"\s*:\s*\[\s*\{'
    rb'|"function_call"\s*:\s*\{'
)
# The keys of what the proxy parses a chunk for: usage, llama.cpp's timings, vLLM's per-request metrics. One
# search for the three: three substring searches cost twice as much (each stops at every quote of the JSON).
_MEASURES = re.compile(rb'"(?:usage|timings|metrics)"')
# What most output chunks hold, as engines write their JSON (no spaces): a search for a literal, which the regex
# engine runs as a plain substring search, a third of `_OUTPUT`'s cost (it tries its alternatives at every quote).
_CONTENT = re.compile(rb'"content":"[^"]')


def has_output(data: bytes) -> bool:
    """Whether a chunk's JSON carries generated output, without parsing it: agrees with `carries_output`."""
    return _CONTENT.search(data) is not None or _OUTPUT.search(data) is not None


def carries_measures(data: bytes) -> bool:
    """Whether a chunk's JSON may carry usage or the engine's timings, without parsing it (a text that mentions
    one of the keys only costs a parse)."""
    return _MEASURES.search(data) is not None


def choice_has_output(choice: Any) -> bool:
    if not isinstance(choice, dict):
        return False
    if isinstance(choice.get("text"), str) and choice["text"]:
        return True
    delta = choice.get("delta")
    return isinstance(delta, dict) and any(delta.get(name) for name in _OUTPUT_DELTA_FIELDS)


def carries_output(chunk: dict[str, Any]) -> bool:
    """Whether a streamed chunk carries generated output (the role-only first chunk and the usage chunk do not)."""
    choices = chunk.get("choices")
    return isinstance(choices, list) and any(choice_has_output(choice) for choice in choices)


def is_usage_chunk(chunk: dict[str, Any]) -> bool:
    """The chunk `include_usage` adds at the end: usage and no choices."""
    return isinstance(chunk.get("usage"), dict) and not chunk.get("choices")


def choices_usage(earlier: dict[str, Any] | None, latest: dict[str, Any]) -> dict[str, Any]:
    """The usage of an answer of several choices whose engine sends a usage chunk for each (llama-server: each
    choice's, with the whole prompt's count): the completions' tokens added up, the prompt's counted once."""
    before = (earlier or {}).get("completion_tokens")
    completion = latest.get("completion_tokens")
    if not isinstance(before, int) or not isinstance(completion, int):
        return latest
    prompt = latest.get("prompt_tokens")
    total = prompt + before + completion if isinstance(prompt, int) else None
    return latest | {"completion_tokens": before + completion, "total_tokens": total}


# -- the Responses API's events ----------------------------------------------------------------------------

# An event carrying generated output: a delta (of text, reasoning, a refusal, a tool call's arguments) whose `delta`
# is a non-empty string. The `.done` events and the final response repeat the whole text: they are not output.
_RESPONSE_DELTA = re.compile(rb'"type"\s*:\s*"response\.[a-z_.]+\.delta"')
_STRING_DELTA = re.compile(rb'"delta"\s*:\s*"(?!")')
# The events that end a response, each with the whole response object (its usage, where the engine counted).
_RESPONSE_ENDS = frozenset({"response.completed", "response.incomplete", "response.failed"})


def is_response_output(data: bytes) -> bool:
    """Whether a Responses API event carries generated output, without parsing it."""
    return _RESPONSE_DELTA.search(data) is not None and _STRING_DELTA.search(data) is not None


def response_end(event: dict[str, Any]) -> dict[str, Any] | None:
    """The response object of the event that ends a response (completed, incomplete or failed), else None."""
    if event.get("type") not in _RESPONSE_ENDS:
        return None
    response = event.get("response")
    return response if isinstance(response, dict) else None


def response_usage(event: dict[str, Any]) -> dict[str, Any] | None:
    """The usage of the event that ends a response (input and output tokens), or None for any other event."""
    response = response_end(event)
    usage = response.get("usage") if response is not None else None
    return usage if isinstance(usage, dict) else None


# -- Anthropic's Messages API's events ------------------------------------------------------------------------

# An event carrying generated output: a content block's delta with a non-empty text, thinking or tool input
# (`partial_json`; a thinking block's `signature_delta` is not output), or the start of a tool call, which names the
# tool as a chat's first tool-call delta does. `message_delta` and `message_stop` repeat nothing: they are not.
_BLOCK_DELTA = re.compile(rb'"type"\s*:\s*"content_block_delta"')
_BLOCK_TEXT = re.compile(rb'"(?:text|thinking|partial_json)"\s*:\s*"(?!")')
_BLOCK_START = re.compile(rb'"type"\s*:\s*"content_block_start"')
_TOOL_USE = re.compile(rb'"type"\s*:\s*"tool_use"')


def is_message_output(data: bytes) -> bool:
    """Whether a Messages API event carries generated output, without parsing it."""
    if _BLOCK_DELTA.search(data) is not None:
        return _BLOCK_TEXT.search(data) is not None
    return _BLOCK_START.search(data) is not None and _TOOL_USE.search(data) is not None


def engine_timings(chunk: dict[str, Any]) -> dict[str, Any] | None:
    for key in ("timings", "metrics"):
        value = chunk.get(key)
        if isinstance(value, dict) and value:
            return value
    return None


# -- assembly -----------------------------------------------------------------------------------------------

_CHOICE_KEYS_BUILT = frozenset({"index", "delta", "text", "logprobs", "finish_reason", "token_ids"})
# The answer's own keys, and those only a stream has: llama-server's `prompt_progress` (`return_progress`), which
# its whole answers never carry.
_CHUNK_KEYS_BUILT = frozenset({"object", "choices", "usage", "prompt_progress"})


class _Choice:
    def __init__(self, index: int) -> None:
        self.index = index
        self.role = "assistant"
        self.text: list[str] = []  # content (chat) or text (completions)
        self.reasoning: dict[str, list[str]] = {}  # reasoning_content or reasoning, as the engine names it
        self.tool_calls: dict[int, dict[str, Any]] = {}
        # Each call's arguments as they came, joined once: adding to a string held in a dict copies all of it each
        # time, and a tool call of 400 KB streamed 3 characters at a time took 2 s of the event loop that way.
        self.arguments: dict[int, list[str]] = {}
        self.logprobs: dict[str, list[Any]] | None = None
        # Whether the engine's chunks name `logprobs` at all (vLLM's say null, llama-server's leave it out unasked):
        # its whole answers do as its chunks do.
        self.logprobs_named = False
        self.token_ids: list[Any] | None = None
        self.finish_reason: Any = None
        self.extra: dict[str, Any] = {}  # engine-specific choice fields (vLLM's stop_reason): last value wins

    def add(self, choice: dict[str, Any]) -> None:
        delta = choice.get("delta")
        if isinstance(delta, dict):
            self._add_delta(delta)
        text = choice.get("text")
        if isinstance(text, str):
            self.text.append(text)
        logprobs = choice.get("logprobs")
        if "logprobs" in choice:
            self.logprobs_named = True
        if isinstance(logprobs, dict):
            # Chat: {"content": [...]}; completions: {"tokens": [...], "token_logprobs": [...], ...}. Lists concatenate.
            merged = self.logprobs if self.logprobs is not None else {}
            for key, value in logprobs.items():
                if isinstance(value, list):
                    merged.setdefault(key, []).extend(value)
            self.logprobs = merged
        token_ids = choice.get("token_ids")
        if isinstance(token_ids, list):  # vLLM's return_token_ids: a chunk's tokens' ids; the answer's are all
            if self.token_ids is None:
                self.token_ids = []
            self.token_ids.extend(token_ids)
        if choice.get("finish_reason") is not None:
            self.finish_reason = choice["finish_reason"]
        for key, value in choice.items():
            if key not in _CHOICE_KEYS_BUILT and (value is not None or key not in self.extra):
                self.extra[key] = value

    def _add_delta(self, delta: dict[str, Any]) -> None:
        if isinstance(delta.get("role"), str):
            self.role = delta["role"]
        content = delta.get("content")
        if isinstance(content, str):
            self.text.append(content)
        for key in ("reasoning_content", "reasoning"):
            if isinstance(delta.get(key), str):
                self.reasoning.setdefault(key, []).append(delta[key])
        for call in delta.get("tool_calls") or ():
            if not isinstance(call, dict):
                continue
            index = call.get("index", len(self.tool_calls))
            built = self.tool_calls.setdefault(index, {})
            for key in ("id", "type"):
                if call.get(key) is not None:
                    built[key] = call[key]
            function = call.get("function")
            if isinstance(function, dict):
                target = built.setdefault("function", {"name": None, "arguments": ""})
                if function.get("name") is not None:
                    target["name"] = function["name"]
                if isinstance(function.get("arguments"), str):
                    self.arguments.setdefault(index, []).append(function["arguments"])

    def chat_result(self) -> dict[str, Any]:
        text = "".join(self.text)
        message: dict[str, Any] = {"role": self.role, "content": text if text or not self.tool_calls else None}
        for key, parts in self.reasoning.items():
            message[key] = "".join(parts)
        if self.tool_calls:
            for index, parts in self.arguments.items():
                self.tool_calls[index]["function"]["arguments"] = "".join(parts)
            message["tool_calls"] = [self.tool_calls[i] for i in sorted(self.tool_calls)]
        return self._result("message", message)

    def completion_result(self) -> dict[str, Any]:
        return self._result("text", "".join(self.text))

    def _result(self, name: str, value: Any) -> dict[str, Any]:
        result = {"index": self.index, name: value}
        if self.logprobs_named:
            result["logprobs"] = self.logprobs
        result["finish_reason"] = self.finish_reason
        return result

    def extra_result(self) -> dict[str, Any]:
        return self.extra if self.token_ids is None else self.extra | {"token_ids": self.token_ids}


class Assembler:
    """Streamed chunks in, the engine's non-streaming answer out: content, tool calls, logprobs, usage."""

    def __init__(self, chat: bool) -> None:
        self.chat = chat
        self.top: dict[str, Any] = {}
        self.choices: dict[int, _Choice] = {}
        self.usage: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None  # the first error event: the engine failed mid-answer

    def add(self, chunk: dict[str, Any]) -> None:
        if chunk.get("error") is not None:  # vLLM's, SGLang's and llama.cpp's way to fail a stream already begun
            if self.error is None:
                self.error = chunk
            return
        for key, value in chunk.items():
            if key not in _CHUNK_KEYS_BUILT and (value is not None or key not in self.top):
                self.top[key] = value
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if isinstance(choice, dict):
                index = choice.get("index", 0)
                self.choices.setdefault(index, _Choice(index)).add(choice)

    def result(self) -> dict[str, Any]:
        body: dict[str, Any] = {}
        for key in ("id", "object", "created", "model"):  # OpenAI's order first
            if key in self.top or key == "object":
                body[key] = self.top.get(key)
        body["object"] = "chat.completion" if self.chat else "text_completion"
        body |= {key: value for key, value in self.top.items() if key not in body}
        choices = [self.choices[i] for i in sorted(self.choices)]
        body["choices"] = [
            (c.chat_result() if self.chat else c.completion_result()) | c.extra_result() for c in choices
        ]
        if self.usage is not None:
            body["usage"] = self.usage
        return body
