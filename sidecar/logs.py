"""structlog set up once for the process: one processor chain, a renderer per sink, redaction on every record."""

from __future__ import annotations

import logging
import logging.handlers
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import structlog
from structlog.tracebacks import ExceptionDictTransformer
from structlog.typing import Processor

from sidecar.redaction import Redactor
from sidecar.settings import Settings

# uvicorn's access log is replaced by our own access line; its other loggers join the pipeline.
_FOREIGN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.asgi")

_SHARED_CHAIN: list[Processor] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]

# Local variables in tracebacks are where tokens leak: never show them.
_json_exceptions = structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False))


def _formatter(redactor: Redactor, renderer: Processor, exceptions: Processor) -> logging.Formatter:
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_SHARED_CHAIN,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            exceptions,
            redactor,
            renderer,
        ],
    )


def _console_formatter(redactor: Redactor, colors: bool) -> logging.Formatter:
    return _formatter(redactor, structlog.dev.ConsoleRenderer(colors=colors), structlog.processors.format_exc_info)


def _json_formatter(redactor: Redactor) -> logging.Formatter:
    return _formatter(redactor, structlog.processors.JSONRenderer(), _json_exceptions)


def configure_logging(settings: Settings, redactor: Redactor) -> None:
    """Route structlog and the standard library (uvicorn's loggers included) through the same sinks."""
    stderr = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        stderr.setFormatter(_json_formatter(redactor))
    else:
        stderr.setFormatter(_console_formatter(redactor, colors=sys.stderr.isatty()))
    handlers: list[logging.Handler] = [stderr]
    if settings.log_dir is not None:
        handlers += _file_handlers(settings, redactor)

    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    for name in _FOREIGN_LOGGERS:
        foreign = logging.getLogger(name)
        foreign.handlers.clear()
        foreign.propagate = True
    logging.getLogger("uvicorn.access").disabled = True
    # httpx logs every request at info: the readiness probe would write ten lines a second during a load.
    for chatty in ("httpx", "httpcore"):
        logging.getLogger(chatty).setLevel(logging.WARNING)

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_SHARED_CHAIN,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


def _file_handlers(settings: Settings, redactor: Redactor) -> list[logging.Handler]:
    """All records, errors only, JSON lines: each rotated by size."""
    directory: Path = settings.log_dir  # type: ignore[assignment]
    directory.mkdir(parents=True, exist_ok=True)

    def rotating(name: str) -> logging.handlers.RotatingFileHandler:
        return logging.handlers.RotatingFileHandler(
            directory / name,
            maxBytes=settings.log_file_max_bytes,
            backupCount=settings.log_file_backups,
            encoding="utf-8",
        )

    everything = rotating("sidecar.log")
    everything.setFormatter(_console_formatter(redactor, colors=False))
    errors = rotating("errors.log")
    errors.setLevel(logging.ERROR)
    errors.setFormatter(_console_formatter(redactor, colors=False))
    json_lines = rotating("sidecar.jsonl")
    json_lines.setFormatter(_json_formatter(redactor))
    return [everything, errors, json_lines]


def get_logger(name: str) -> Any:
    return structlog.stdlib.get_logger(name)


@contextmanager
def timer(log: Any, event: str, **fields: Any) -> Iterator[dict[str, Any]]:
    """Log `event` with its duration_ms when the block ends; the block may add fields to the yielded dict."""
    extra: dict[str, Any] = {}
    start = time.perf_counter()
    try:
        yield extra
    except BaseException as exc:
        duration_ms = round((time.perf_counter() - start) * 1000, 3)
        log.warning(event, duration_ms=duration_ms, outcome="error", error=repr(exc), **fields, **extra)
        raise
    duration_ms = round((time.perf_counter() - start) * 1000, 3)
    log.info(event, duration_ms=duration_ms, outcome="ok", **fields, **extra)
