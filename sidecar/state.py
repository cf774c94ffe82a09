"""The engine's lifecycle states."""

from __future__ import annotations

import enum


class EngineState(enum.StrEnum):
    IDLE = "idle"
    LOADING = "loading"
    READY = "ready"
    UNLOADING = "unloading"
    FAILED = "failed"
