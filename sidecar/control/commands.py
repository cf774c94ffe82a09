"""What the engine's owner is asked to do: one command each, answered through its future."""

from __future__ import annotations

from dataclasses import dataclass

from engines import EngineAdapter
from sidecar.control.engine import Engine, LoadRequest
from sidecar.control.inbox import Command
from sidecar.control.records import Loaded, Slept, Unloaded, Woken
from sidecar.errors import ServiceUnavailable


@dataclass(eq=False)
class Load(Command[Loaded]):
    """Answered (200, the ready engine) with `wait`, else (202, the status) once the engine's process exists."""

    request: LoadRequest
    adapter: EngineAdapter


@dataclass(eq=False)
class Unload(Command[Unloaded]):
    drain_timeout_s: float


@dataclass(eq=False)
class Sleep(Command[Slept]):
    level: int


@dataclass(eq=False)
class Wake(Command[Woken]):
    pass


@dataclass(eq=False)
class Crashed(Command[None]):
    """The engine's watcher: its process exited."""

    engine: Engine


@dataclass(eq=False)
class IdleUnload(Command[None]):
    """The idle watcher: no request started or ended for the engine's TTL."""

    engine: Engine  # the engine that was idle when the watcher looked


@dataclass(eq=False)
class Shutdown(Command[None]):
    final: bool  # False: the server began to stop (SIGTERM); True: the lifespan ends, everything stops


def shutting_down(what: str) -> ServiceUnavailable:
    return ServiceUnavailable(f"the sidecar is shutting down: {what}", code="shutting_down")
