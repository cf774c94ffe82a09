"""Engine adapters: one module per engine, registered under the entry-point group `sidecar.engines`."""

from engines.base import AdapterError, ArgValue, EngineAdapter, LoadSeries, LoraApi, SleepApi, flags_from_args
from engines.registry import UnknownEngine, adapter, registered

__all__ = [
    "AdapterError",
    "ArgValue",
    "EngineAdapter",
    "LoadSeries",
    "LoraApi",
    "SleepApi",
    "UnknownEngine",
    "adapter",
    "flags_from_args",
    "registered",
]
