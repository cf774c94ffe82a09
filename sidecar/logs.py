"""structlog set up once for the process: one processor chain, a renderer per sink, redaction on every record.

structlog's loggers hand their records straight to the sinks, not through the standard library's logging: that
path (a LogRecord made twice, the caller found by walking the stack, a formatter per handler) cost about 95 µs
a record, the largest part of the sidecar's CPU per request. The standard library's records (uvicorn's) join
the same chain through one handler. How a record becomes a line is `log_format.py`'s.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO, cast

import structlog
from structlog.typing import EventDict, Processor

from sidecar.log_format import JSON, PLAIN, Format, console_format
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


@dataclass
class _Sink:
    writer: BackgroundWriter  # its own thread writes the lines: never the event loop
    format: Format
    level: int

    def emit(self, level: int, event_dict: EventDict, redactor: Redactor) -> None:
        if level >= self.level:
            event_dict = cast(EventDict, self.format.exceptions(None, "", dict(event_dict)))
            self.writer.write(self.format.render(redactor(None, "", event_dict)))


# One writer thread a stream (streams hash by identity), however often logging is configured.
_writers: dict[TextIO, BackgroundWriter] = {}


def _stream_sink(stream: TextIO, format: Format) -> _Sink:
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


def _file_sink(path: Path, settings: Settings, format: Format, level: int, closers: list[Callable[[], None]]) -> _Sink:
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
        stderr_format = JSON
    else:
        stderr_format = console_format(colors=sys.stderr.isatty())
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
        _file_sink(directory / "sidecar.log", settings, PLAIN, logging.NOTSET, closers),
        _file_sink(directory / "errors.log", settings, PLAIN, logging.ERROR, closers),
        _file_sink(directory / "sidecar.jsonl", settings, JSON, logging.NOTSET, closers),
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
