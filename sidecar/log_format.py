"""How a log record becomes a line: JSON (one object a line); plain, structlog's console layout without colour, for
files and a console that is not a terminal (structlog's ConsoleRenderer, made for a developer's terminal, takes
100 µs an access line, this 10); or that renderer, coloured, for a terminal. Every format writes control
characters as escapes: a value from a request (a path, a model name) never starts a line of its own in a log nor
carries a terminal's escape sequence into it."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from structlog.tracebacks import ExceptionDictTransformer
from structlog.typing import EventDict, Processor

# Local variables in tracebacks are where tokens leak: never show them.
_json_exceptions = structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False))
_FIRST_KEYS = ("timestamp", "level", "event", "logger")


# Control characters, C1's included: a request's path or a model name must not start a line of its own in a log,
# nor carry a terminal's escape sequence into it.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_control(match: re.Match[str]) -> str:
    char = match.group()
    return _NAMED_ESCAPES.get(char) or f"\\x{ord(char):02x}"


def escape_controls(text: str) -> str:
    """`text` with its control characters written as escapes (`\\n`, `\\x1b`): one line, nothing a terminal runs."""
    return _CONTROL.sub(_escape_control, text) if _CONTROL.search(text) else text


def _json_line(event_dict: EventDict) -> str:
    # json escapes what is below 0x20; DEL and C1 it leaves as they are.
    return escape_controls(json.dumps(event_dict, default=repr, ensure_ascii=False))


def _plain_line(event_dict: EventDict) -> str:
    """structlog's console layout without colour: time, level, event, logger, then key=value sorted by key."""
    exception = event_dict.pop("exception", None)
    fields = " ".join(
        f"{key}={value}" if isinstance(value, str) else f"{key}={value!r}"
        for key, value in sorted(event_dict.items())
        if key not in _FIRST_KEYS
    )
    line = (
        f"{event_dict.get('timestamp', '')} [{event_dict.get('level', ''):<9}] {event_dict.get('event', ''):<30} "
        f"[{event_dict.get('logger', '')}] {fields}"
    )
    line = escape_controls(line)  # the record's own line; a traceback's lines follow it as they are
    return f"{line}\n{exception}" if exception else line


@dataclass(frozen=True)
class Format:
    exceptions: Processor  # the exception made text (or a dict) first: redaction must see it
    render: Callable[[EventDict], str]


JSON = Format(_json_exceptions, _json_line)
PLAIN = Format(structlog.processors.format_exc_info, _plain_line)


def console_format(colors: bool) -> Format:
    if not colors:
        return PLAIN
    renderer = structlog.dev.ConsoleRenderer(colors=True)

    def render(event_dict: EventDict) -> str:
        # The renderer's own colours are escape sequences: the values are escaped before it adds them.
        escaped = {
            key: escape_controls(value) if isinstance(value, str) and key != "exception" else value
            for key, value in event_dict.items()
        }
        return str(renderer(None, "", escaped))

    return Format(structlog.processors.format_exc_info, render)
