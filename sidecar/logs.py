"""structlog set up once for the process: one processor chain, a renderer per sink, redaction on every record.

structlog's loggers hand their records straight to the sinks, not through the standard library's logging: that
path (a LogRecord made twice, the caller found by walking the stack, a formatter per handler) cost about 95 µs
a record, the largest part of the sidecar's CPU per request. The standard library's records (uvicorn's) join
the same chain through one handler. Without a terminal the console format is rendered by `_plain_line`:
structlog's ConsoleRenderer, made for a developer's terminal, takes 100 µs an access line, this 10.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO, cast

import structlog
from structlog.tracebacks import ExceptionDictTransformer
from structlog.typing import EventDict, Processor

from sidecar.log_writer import BackgroundWriter, stream_lines
from sidecar.redaction import Redactor
from sidecar.settings import Settings

# uvicorn's access log is replaced by our own access line; its other loggers join the pipeline.
_FOREIGN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.asgi")

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "msg": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "exception": logging.ERROR,
    "critical": logging.CRITICAL,
    "fatal": logging.CRITICAL,
}

# What every record gets, structlog's and the standard library's alike.
_SHARED_CHAIN: list[Processor] = [
    structlog.contextvars.merge_contextvars,
    structlog.processors.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]
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
class _Format:
    exceptions: Processor  # the exception made text (or a dict) first: redaction must see it
    render: Callable[[EventDict], str]


_JSON = _Format(_json_exceptions, _json_line)
_PLAIN = _Format(structlog.processors.format_exc_info, _plain_line)


def _console_format(colors: bool) -> _Format:
    if not colors:
        return _PLAIN
    renderer = structlog.dev.ConsoleRenderer(colors=True)

    def render(event_dict: EventDict) -> str:
        # The renderer's own colours are escape sequences: the values are escaped before it adds them.
        escaped = {
            key: escape_controls(value) if isinstance(value, str) and key != "exception" else value
            for key, value in event_dict.items()
        }
        return str(renderer(None, "", escaped))

    return _Format(structlog.processors.format_exc_info, render)


@dataclass
class _Sink:
    writer: BackgroundWriter  # its own thread writes the lines: never the event loop
    format: _Format
    level: int

    def emit(self, level: int, event_dict: EventDict, redactor: Redactor) -> None:
        if level >= self.level:
            event_dict = cast(EventDict, self.format.exceptions(None, "", dict(event_dict)))
            self.writer.write(self.format.render(redactor(None, "", event_dict)))


# One writer thread a stream (streams hash by identity), however often logging is configured.
_writers: dict[TextIO, BackgroundWriter] = {}


def _stream_sink(stream: TextIO, format: _Format) -> _Sink:
    writer = _writers.get(stream)
    if writer is None:
        writer = _writers[stream] = BackgroundWriter(stream_lines(stream))
    return _Sink(writer, format, logging.NOTSET)


def flush_logs(timeout_s: float | None = None) -> None:
    """Everything logged so far written to the streams and files (tests read them; at exit atexit does this)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    for sink in _pipeline.sinks:
        sink.writer.flush(None if deadline is None else max(0.0, deadline - time.monotonic()))


class _RotatingFile(logging.handlers.RotatingFileHandler):
    """A log file rotated by size by the standard library's rules, a line at a time, written in batches."""

    def write_lines(self, lines: list[str]) -> None:
        for line in lines:
            if self.shouldRollover(logging.makeLogRecord({"msg": line})):  # which opens the file where it is closed
                self.doRollover()
            cast(TextIO, self.stream).write(line + "\n")
        self.flush()


def _file_sink(path: Path, settings: Settings, format: _Format, level: int, closers: list[Callable[[], None]]) -> _Sink:
    file = _RotatingFile(
        path, maxBytes=settings.log_file_max_bytes, backupCount=settings.log_file_backups, encoding="utf-8"
    )
    writer = BackgroundWriter(file.write_lines)
    closers += [writer.close, file.close]  # its lines written, then the file closed
    return _Sink(writer, format, level)


class _Pipeline:
    """What the processor chain reads at each record: reconfiguring replaces it here, so that loggers structlog
    has cached keep working."""

    def __init__(self) -> None:
        self.level = logging.INFO
        self.redactor = Redactor()
        self.sinks: list[_Sink] = []
        self.closers: list[Callable[[], None]] = []

    def gate(self, logger: Any, method_name: str, event_dict: EventDict) -> EventDict:
        if _LEVELS.get(method_name, logging.INFO) < self.level:
            raise structlog.DropEvent
        return event_dict

    def write(self, logger: Any, method_name: str, event_dict: EventDict) -> EventDict:
        level = _LEVELS.get(method_name, logging.INFO)
        for sink in self.sinks:
            sink.emit(level, event_dict, self.redactor)
        raise structlog.DropEvent  # written: nothing left for the logger itself


_pipeline = _Pipeline()


class _Named:
    """What structlog calls the logger: here only a name, as the chain's last step writes every record."""

    def __init__(self, name: str = "") -> None:
        self.name = name


def _add_logger_name(logger: _Named, method_name: str, event_dict: EventDict) -> EventDict:
    event_dict["logger"] = logger.name
    return event_dict


class _StandardLibraryBridge(logging.Handler):
    """The standard library's records (uvicorn's) into the same chain and sinks."""

    def emit(self, record: logging.LogRecord) -> None:
        event_dict: EventDict = {"event": record.getMessage(), "logger": record.name}
        if record.exc_info:
            event_dict["exc_info"] = record.exc_info
        method = record.levelname.lower()
        try:
            for processor in _SHARED_CHAIN:
                event_dict = cast(EventDict, processor(None, method, event_dict))
            _pipeline.write(None, method, event_dict)
        except structlog.DropEvent:
            pass


def configure_logging(settings: Settings, redactor: Redactor) -> None:
    """structlog's records and the standard library's (uvicorn's loggers included) to the same sinks."""
    for close in _pipeline.closers:
        close()
    level = logging.getLevelName(settings.log_level.upper())
    if settings.log_format == "json":
        stderr_format = _JSON
    else:
        stderr_format = _console_format(colors=sys.stderr.isatty())
    sinks = [_stream_sink(sys.stderr, stderr_format)]
    closers: list[Callable[[], None]] = []
    if settings.log_dir is not None:
        sinks += _file_sinks(settings, closers)
    _pipeline.level, _pipeline.redactor, _pipeline.sinks, _pipeline.closers = level, redactor, sinks, closers

    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    root.addHandler(_StandardLibraryBridge())
    root.setLevel(level)
    for name in _FOREIGN_LOGGERS:
        foreign = logging.getLogger(name)
        foreign.handlers.clear()
        foreign.propagate = True
    logging.getLogger("uvicorn.access").disabled = True
    # httpx logs every request at info: the readiness probe would write ten lines a second during a load.
    for chatty in ("httpx", "httpcore"):
        logging.getLogger(chatty).setLevel(logging.WARNING)

    # One list, changed in place: loggers structlog has cached hold it (structlog.testing.capture_logs does so too).
    _PROCESSORS[:] = [
        _pipeline.gate,
        _add_logger_name,
        *_SHARED_CHAIN,
        structlog.processors.StackInfoRenderer(),
        _pipeline.write,
    ]
    structlog.configure(
        processors=_PROCESSORS,
        # The level is checked by the chain's first step, so that reconfiguring it reaches cached loggers too.
        wrapper_class=structlog.make_filtering_bound_logger(logging.NOTSET),
        logger_factory=_Named,
        cache_logger_on_first_use=True,
    )


_PROCESSORS: list[Processor] = []


def _file_sinks(settings: Settings, closers: list[Callable[[], None]]) -> list[_Sink]:
    """All records, errors only, JSON lines: each rotated by size."""
    directory: Path = settings.log_dir  # type: ignore[assignment]
    directory.mkdir(parents=True, exist_ok=True)
    return [
        _file_sink(directory / "sidecar.log", settings, _PLAIN, logging.NOTSET, closers),
        _file_sink(directory / "errors.log", settings, _PLAIN, logging.ERROR, closers),
        _file_sink(directory / "sidecar.jsonl", settings, _JSON, logging.NOTSET, closers),
    ]


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)


class Throttle:
    """For a line about what can happen thousands of times a second (a storm of refusals, a reading that fails
    every sample): at most one every `every_s`, the first at once, each saying how many happened since the last.
    Not thread-safe: one per thread that uses it."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self._logged_at = -every_s
        self._count = 0

    def due(self) -> int:
        """Counts one; how many to report where a line is due now, else 0."""
        self._count += 1
        now = time.monotonic()
        if now - self._logged_at < self.every_s:
            return 0
        count, self._count, self._logged_at = self._count, 0, now
        return count


class LineBudget:
    """For lines a source outside the sidecar writes at its own pace (the engine's output): `per_s` a second on
    average and up to ten seconds' worth at once, so that a burst (a start-up, a traceback) is whole and a flood
    costs the event loop at most that many lines a second (each one logged is 12-15 µs of it). 0: no bound."""

    def __init__(self, per_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_s = per_s
        self.burst = per_s * 10
        self.clock = clock
        self._left = self.burst
        self._at = clock()

    def take(self, lines: int = 1) -> int:
        """How many of `lines` more may go now (they are counted)."""
        if not self.per_s:
            return lines
        now = self.clock()
        self._left = min(self.burst, self._left + (now - self._at) * self.per_s)
        self._at = now
        taken = min(lines, int(self._left))
        self._left -= taken
        return taken


def write_record(name: str, method: str, event_dict: EventDict) -> None:
    """One record through the configured chain, as `get_logger(name).<method>(**event_dict)` would send it, without
    structlog's logger objects: for the access line, written once a request (they cost 6-7 µs of its 40)."""
    logger = _Named(name)
    try:
        for processor in _PROCESSORS:
            event_dict = cast(EventDict, processor(logger, method, event_dict))
    except structlog.DropEvent:
        pass


clock: Callable[[], float] = time.perf_counter  # the timer's clock, in seconds: tests replace it


@contextmanager
def timer(log: Any, event: str, **fields: Any) -> Iterator[dict[str, Any]]:
    """Log `event` with its duration_ms when the block ends; the block may add fields to the yielded dict."""
    extra: dict[str, Any] = {}
    start = clock()
    try:
        yield extra
    except BaseException as exc:
        duration_ms = round((clock() - start) * 1000, 3)
        log.warning(event, duration_ms=duration_ms, outcome="error", error=repr(exc), **fields, **extra)
        raise
    duration_ms = round((clock() - start) * 1000, 3)
    log.info(event, duration_ms=duration_ms, outcome="ok", **fields, **extra)
