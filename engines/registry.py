"""Engines by name, from the entry-point group `sidecar.engines`: nothing else can be imported or run."""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points

from engines.base import EngineAdapter

GROUP = "sidecar.engines"


class UnknownEngine(LookupError):
    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"unknown engine {name!r}; known engines: {', '.join(known)}")
        self.known = known


def registered() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def adapter(name: str, executable: str | None = None) -> EngineAdapter:
    """The adapter registered under `name`, built with an optional executable from settings."""
    known = registered()
    if name not in known:
        raise UnknownEngine(name, sorted(known))
    factory: Callable[[str | None], EngineAdapter] = known[name].load()
    return factory(executable)
