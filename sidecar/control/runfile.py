"""The engine a sidecar runs, recorded in a file under the run directory, so that the next sidecar on the same
port finds an engine a previous one left behind (one killed with SIGKILL before its guard could act, say) and
stops it. Stopping rather than adopting: an adopted engine's output and exit status could not be read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psutil

from sidecar.control.guard import group_alive, stop_group
from sidecar.logs import get_logger

log = get_logger("sidecar.runfile")


class EngineRecord:
    def __init__(self, run_dir: Path, sidecar_port: int) -> None:
        self.path = run_dir / f"engine-{sidecar_port}.json"

    def write(self, pid: int, engine: str, port: int) -> None:
        try:
            started = psutil.Process(pid).create_time()
        except psutil.NoSuchProcess:
            return
        record = {"pid": pid, "pgid": pid, "create_time": started, "engine": engine, "port": port}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(record))
        temporary.replace(self.path)  # never half a record

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)

    def stop_leftover(self, grace_s: float) -> dict[str, Any] | None:
        """Stop the engine the record names if it is still the same process; the record, or None without one."""
        try:
            record: dict[str, Any] = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            self.clear()
            return None
        try:
            pid, pgid, started = int(record["pid"]), int(record["pgid"]), float(record["create_time"])
        except (KeyError, TypeError, ValueError):
            self.clear()
            return None
        try:
            ours = abs(psutil.Process(pid).create_time() - started) < 0.01  # else the pid was reused
        except psutil.NoSuchProcess:
            # The leader is gone; a group id is not reused while its group has members, so they are the engine's.
            ours = pgid > 1 and group_alive(pgid)
        if ours:
            log.warning("stale_engine_stopped", pid=pid, engine=record.get("engine"), port=record.get("port"))
            stop_group(pgid, grace_s)
        self.clear()
        return record
