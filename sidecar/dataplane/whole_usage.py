"""The usage of a whole JSON answer, read without parsing the answer.

An embeddings answer is large (64 embeddings of 1,024 floats are 1.4 MB) and its usage a few hundred bytes, at its
end as vLLM writes it (OpenAI's order) or at its head as llama-server does (after its model and object, before its
data). Parsing the whole answer and writing it again to add `usage.performance` cost the sidecar 4 to 6 times the
CPU nginx spends relaying it (`python -m bench.embeddings`); read from the answer's end or head, the usage is found
in its few KiB there, and the rest goes on as the engine's reads brought it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import orjson

_SPACE = b" \t\r\n"
_EDGE = 4096  # the bytes at an answer's end or head searched for its usage, an object of a few hundred bytes
# A `usage` key and its colon (a quote escaped before it: another key, ending with the word).
_USAGE_KEY = re.compile(rb'"usage"\s*:\s*')
# An answer's head up to its usage's value where every member before it is a string, a number or a literal: the
# `usage` found is then a key of the outermost object, not of anything nested.
_STRING = rb'"(?:[^"\\]|\\.)*"'
_SCALAR = rb"(?:" + _STRING + rb"|-?[0-9][0-9.eE+-]*|true|false|null)"
_HEAD_TO_USAGE = re.compile(rb"\{\s*(?:" + _STRING + rb"\s*:\s*" + _SCALAR + rb"\s*,\s*)*" + rb'"usage"\s*:\s*')

Split = tuple[list[bytes], dict[str, Any], list[bytes]]


def split_at_usage(parts: list[bytes]) -> Split | None:
    """An answer read in `parts` whose outermost object has its `usage` object at its end or its head: what comes
    before the usage's value (the parts outside the few KiB searched as they are, not copied), the usage, and what
    comes after it. None where the usage is elsewhere, or the answer is not an object."""
    if not parts or not parts[0].startswith(b"{"):
        return None
    return _at_end(parts) or _at_head(parts)


def _at_end(parts: list[bytes]) -> Split | None:
    """The usage as the answer's last member. In a valid answer a `"usage"` whose object value is closed by the
    answer's own last brace is a member of the outermost object."""
    first = len(parts) - _edge(map(len, reversed(parts)))
    tail = b"".join(parts[first:])
    end = _closed(tail)
    key = tail.rfind(b'"usage"', 0, end)
    if not end or key <= 0 or tail[key - 1] == 0x5C:  # 0x5C: a backslash
        return None
    colon = _USAGE_KEY.match(tail, key)
    if colon is None:
        return None
    try:
        usage = orjson.loads(memoryview(tail)[colon.end() : end - 1])
    except orjson.JSONDecodeError:  # more members after it, or a `usage` nested in its own value
        return None
    if not isinstance(usage, dict):
        return None
    while tail[end - 2] in _SPACE:  # what follows the usage's value, the space before the last brace too
        end -= 1
    return [*parts[:first], tail[: colon.end()]], usage, [tail[end - 1 :]]


def _at_head(parts: list[bytes]) -> Split | None:
    """The usage after none but scalar members: its object read up to the first closing brace that ends it."""
    if not _closed(parts[-1]):  # the outermost object cut short
        return None
    count = _edge(map(len, parts))
    head = b"".join(parts[:count])
    key = _HEAD_TO_USAGE.match(head, 0, _EDGE)
    if key is None or not head.startswith(b"{", key.end()):
        return None
    end = key.end()
    while (end := head.find(b"}", end, _EDGE) + 1) > 0:
        try:
            usage = orjson.loads(memoryview(head)[key.end() : end])
        except orjson.JSONDecodeError:  # a brace of its own nested object, or in a string of it
            continue
        return [head[: key.end()]], usage, [head[end:], *parts[count:]]
    return None


def _edge(sizes: Iterator[int]) -> int:
    """How many parts, of these sizes in this order, hold an edge's _EDGE bytes (all of them where fewer)."""
    count = total = 0
    for size in sizes:
        count += 1
        total += size
        if total >= _EDGE:
            break
    return count


def _closed(data: bytes) -> int:
    """Where `data` ends past its closing brace, trailing space left out; 0 where it does not end with one."""
    end = len(data)
    while end and data[end - 1] in _SPACE:
        end -= 1
    return end if data.endswith(b"}", 0, end) else 0
