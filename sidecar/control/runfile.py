"""The engine a sidecar runs, recorded in a file under the run directory, so that the next sidecar on the same
port finds an engine a previous one left behind (one killed with SIGKILL before its guard could act, say) and
stops it. Stopping rather than adopting: an adopted engine's output and exit status could not be read."""

from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path
from typing import Any

import psutil

from sidecar.control.guard import group_alive, stop_group
from sidecar.logs import get_logger
from sidecar.settings import SettingsError

log = get_logger("sidecar.runfile")


def private_run_dir(path: Path) -> None:
    """Make the run directory (`SIDECAR_RUN_DIR`), or check the one there: a directory of this user's that no
    other user can write. What it holds is acted on: the engine record names a process group the next sidecar
    stops, and the workers' sockets and shared state carry the engine's. In a directory another user can write
    (a /tmp/sidecar they made first), their record would have the sidecar kill any process they name."""
    try:
        with contextlib.suppress(FileExistsError):  # a file, or a link to one: said below
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        found = os.lstat(path)
    except OSError as exc:
        raise SettingsError(f"SIDECAR_RUN_DIR {path}: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(found.st_mode):  # lstat: a link is refused, not followed
        raise SettingsError(f"SIDECAR_RUN_DIR {path} is not a directory (a link or a file): name a directory")
    if found.st_uid != os.geteuid():
        raise SettingsError(
            f"SIDECAR_RUN_DIR {path} belongs to another user (uid {found.st_uid}): its engine record would be "
            "trusted; remove it or choose another directory"
        )
    if found.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise SettingsError(
            f"SIDECAR_RUN_DIR {path} can be written by other users (mode {stat.S_IMODE(found.st_mode):o}): its "
            "engine record would be trusted; remove it or choose another directory"
        )


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
