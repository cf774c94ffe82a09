"""`sidecar serve`: settings from the environment and `.env`, flags on top, uvicorn on uvloop and httptools.

`sidecar demo`: the same sidecar with an engine loaded, one streamed chat request through it, then stop.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from typing import Any

from sidecar import __version__
from sidecar.control.engine import free_port
from sidecar.control.runfile import private_run_dir
from sidecar.demo import demo
from sidecar.errors import SidecarError
from sidecar.logs import configure_logging, get_logger
from sidecar.redaction import Redactor
from sidecar.server.app import autoload_request
from sidecar.server.serving import serve_with_workers, serve_worker, server
from sidecar.settings import Settings, SettingsError, load_settings
from sidecar.telemetry import resources

log = get_logger("sidecar.cli")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sidecar", description="Reverse-proxy sidecar for LLM engine servers.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the sidecar")
    serve.add_argument("--host", help="address to listen on (overrides SIDECAR_HOST)")
    serve.add_argument("--port", type=int, help="port to listen on (overrides SIDECAR_PORT)")
    serve.add_argument("--env-file", default=".env", help="dotenv file to read settings from (default: .env)")
    demo = commands.add_parser(
        "demo", help="start the sidecar with an engine, stream one chat completion through it with its metrics, stop"
    )
    demo.add_argument("--engine", default="mock", help="engine to load (default: mock, which needs no GPU)")
    demo.add_argument("--model", default="mock-model", help="model to load (default: mock-model)")
    demo.add_argument("--args", type=json.loads, default={}, help="engine flags as JSON: '{\"max-model-len\": 4096}'")
    demo.add_argument("--prompt", default="Why measure time to first token?", help="the user message")
    demo.add_argument("--port", type=int, help="port to listen on (default: a free one)")
    demo.add_argument("--env-file", default=".env", help="dotenv file to read settings from (default: .env)")
    # Started by `serve` with SIDECAR_WORKERS > 1, with its settings in the environment: not for people.
    worker = commands.add_parser("worker")
    worker.add_argument("index", type=int)
    worker.add_argument("fd", type=int, help="the listening socket, inherited")
    return parser


def _logging_and_autoload(settings: Settings) -> Redactor | None:
    """Logging configured, then SIDECAR_AUTOLOAD_* checked as a load's 400 would check it: the redactor, or None
    where the autoload is bad (said in one line), before anything serves."""
    redactor = Redactor()
    configure_logging(settings, redactor)
    try:
        autoload_request(settings)
    except SidecarError as exc:
        log.error("autoload_failed", engine=settings.autoload_engine, param=exc.param, error=exc.message)
        return None
    return redactor


def serve(settings: Settings, redactor: Redactor) -> None:
    resources.raise_open_files_limit(settings)
    if settings.workers > 1:
        serve_with_workers(settings, redactor)
    else:
        server(settings, redactor).run()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    resources.set_malloc_thresholds()
    if args.command == "worker":
        serve_worker(args.index, args.fd)
        return 0
    overrides: dict[str, Any] = {"port": args.port} if args.port is not None else {}
    if args.command == "serve" and args.host is not None:
        overrides["host"] = args.host
    if args.command == "demo":
        overrides |= {"host": "127.0.0.1", "autoload_engine": args.engine, "autoload_model": args.model}
        overrides |= {"autoload_args": args.args, "port": args.port or free_port()}
    try:
        settings = load_settings(args.env_file, **overrides)
        private_run_dir(settings.run_dir)  # before anything reads or writes it
    except SettingsError as exc:
        # Logging is not configured yet (its settings may be the bad ones): a plain structured line to stderr.
        logging.basicConfig(format="%(message)s")
        log.error("settings_invalid", error=str(exc))
        return 2
    redactor = _logging_and_autoload(settings)
    if redactor is None:
        return 2
    if args.command == "demo":
        return demo(settings, redactor, args.prompt)
    try:
        serve(settings, redactor)
    except SettingsError as exc:  # what only the app can check: the OpenTelemetry variables (sidecar/telemetry/otel.py)
        log.error("settings_invalid", error=str(exc))
        return 2
    return 0
