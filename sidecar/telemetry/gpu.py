"""GPU memory and utilisation through NVML (nvidia-ml-py), for the watchdog and per-request readings.

NVML is initialised once and its device handles cached. Only the GPUs the engine can see are read:
CUDA_VISIBLE_DEVICES (or NVIDIA_VISIBLE_DEVICES), as indices or UUIDs. Without the library, a driver or a
GPU, `available` is false, one warning says why, and every reading is None; every NVML error is caught.
"""

from __future__ import annotations

import importlib
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from sidecar.logs import get_logger

log = get_logger("sidecar.gpu")

MB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class GpuReading:
    index: int  # as NVML numbers it
    used_mb: float
    total_mb: float
    utilization_pct: float | None
    processes_mb: dict[int, float | None]  # pid -> its GPU memory; None where the driver cannot say


def visible_devices(environ: dict[str, str] | os._Environ[str] = os.environ) -> list[str] | None:
    """The devices named by CUDA_VISIBLE_DEVICES or NVIDIA_VISIBLE_DEVICES; None: all of them."""
    for name in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"):
        value = environ.get(name)
        if value is None or value.strip().lower() == "all":
            continue
        if value.strip().lower() in {"", "none", "void", "-1"}:
            return []
        return [item.strip() for item in value.split(",") if item.strip()]
    return None


def _load_nvml() -> ModuleType | None:
    try:
        return importlib.import_module("pynvml")  # nvidia-ml-py: untyped, so held as a module
    except ImportError:
        return None


class Gpus:
    def __init__(self, nvml: ModuleType | None = None, environ: dict[str, str] | None = None) -> None:
        self._nvml = nvml if nvml is not None else _load_nvml()
        self._handles: list[tuple[int, Any]] = []
        self.available = False
        if self._nvml is None:
            log.warning("gpu_unavailable", reason="nvidia-ml-py is not installed: GPU fields are null")
            return
        try:
            self._nvml.nvmlInit()
            self._handles = self._visible_handles(visible_devices(environ if environ is not None else os.environ))
        except Exception as exc:  # NVMLError and its many subclasses, or a broken library
            log.warning("gpu_unavailable", reason=f"NVML: {exc}: GPU fields are null")
            return
        if not self._handles:
            log.warning("gpu_unavailable", reason="no GPU is visible: GPU fields are null")
            return
        self.available = True
        log.info("gpu_found", gpus=[index for index, _ in self._handles])

    def _visible_handles(self, names: list[str] | None) -> list[tuple[int, Any]]:
        nvml = self._nvml
        assert nvml is not None
        count = nvml.nvmlDeviceGetCount()
        if names is None:
            return [(i, nvml.nvmlDeviceGetHandleByIndex(i)) for i in range(count)]
        handles = []
        for name in names:
            if name.isdigit() and int(name) < count:
                handles.append((int(name), nvml.nvmlDeviceGetHandleByIndex(int(name))))
            elif name.startswith(("GPU-", "MIG-")):
                handle = nvml.nvmlDeviceGetHandleByUUID(name)
                index = next((i for i in range(count) if _same(nvml, i, handle)), len(handles))
                handles.append((index, handle))
        return handles

    def read(self) -> list[GpuReading] | None:
        """Every visible GPU now; None without GPUs or when NVML fails."""
        if not self.available:
            return None
        nvml = self._nvml
        assert nvml is not None
        # NVML is thread-safe: the watchdog's thread and the event loop's per-request reads need no lock.
        readings = []
        try:
            for index, handle in self._handles:
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                readings.append(
                    GpuReading(
                        index=index,
                        used_mb=round(memory.used / MB, 1),
                        total_mb=round(memory.total / MB, 1),
                        utilization_pct=self._utilization(handle),
                        processes_mb=self._processes(handle),
                    )
                )
        except Exception as exc:
            log.debug("gpu_read_failed", error=str(exc))
            return None
        return readings

    def used_mb(self) -> float | None:
        """Used memory summed over the visible GPUs: the per-request reading (one NVML call per GPU)."""
        if not self.available:
            return None
        nvml = self._nvml
        assert nvml is not None
        try:
            used: int = sum(nvml.nvmlDeviceGetMemoryInfo(h).used for _, h in self._handles)
        except Exception as exc:
            log.debug("gpu_read_failed", error=str(exc))
            return None
        return round(used / MB, 1)

    def _utilization(self, handle: Any) -> float | None:
        assert self._nvml is not None
        try:
            return float(self._nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception:
            return None  # not every device (MIG slices) reports it

    def _processes(self, handle: Any) -> dict[int, float | None]:
        assert self._nvml is not None
        try:
            processes = self._nvml.nvmlDeviceGetComputeRunningProcesses(handle)
        except Exception:
            return {}
        # usedGpuMemory is None where the driver cannot say (some containers, MIG): the pid is still listed.
        return {p.pid: None if p.usedGpuMemory is None else round(p.usedGpuMemory / MB, 1) for p in processes}

    def close(self) -> None:
        """At shutdown, once the watchdog has stopped."""
        if self.available and self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
        self.available = False


def _same(nvml: ModuleType, index: int, handle: Any) -> bool:
    try:
        return bool(nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetHandleByIndex(index)) == nvml.nvmlDeviceGetUUID(handle))
    except Exception:
        return False


def processes_memory_mb(readings: Iterable[GpuReading] | None, pids: set[int]) -> float | None:
    """GPU memory of the given processes; None when none of them is on a GPU or the driver does not say."""
    if readings is None:
        return None
    found = [mb for reading in readings for pid, mb in reading.processes_mb.items() if pid in pids]
    if not found or any(mb is None for mb in found):
        return None
    return round(sum(mb for mb in found if mb is not None), 1)


def on_gpu(readings: Iterable[GpuReading] | None, pids: set[int]) -> bool:
    """Whether any of the given processes still holds GPU memory."""
    return readings is not None and any(pid in pids for reading in readings for pid in reading.processes_mb)


RELEASE_TIMEOUT_S = 15.0  # how long an engine's GPU memory may take to come back after its processes exit
_RELEASE_POLL_S = 0.1


def engine_memory_mb(gpus: Gpus | None, pids: set[int]) -> float | None:
    """The engine's own GPU memory where the driver reports it per process, else all used GPU memory."""
    if gpus is None or not gpus.available:
        return None
    own = processes_memory_mb(gpus.read(), pids)
    return own if own is not None else gpus.used_mb()


def freed_mb(gpus: Gpus | None, before: float | None, pids: set[int]) -> float | None:
    """Once the engine's processes have left the GPUs (or the deadline passed): how much memory came back.

    The driver frees a process's memory shortly after it exits, so this polls rather than reads once (blocking).
    """
    if gpus is None or before is None:
        return None
    deadline = time.monotonic() + RELEASE_TIMEOUT_S
    while time.monotonic() < deadline:
        if not on_gpu(gpus.read(), pids):
            break
        time.sleep(_RELEASE_POLL_S)
    else:
        log.warning("gpu_memory_not_released", pids=sorted(pids), timeout_s=RELEASE_TIMEOUT_S)
    after = gpus.used_mb()
    return None if after is None else round(before - after, 1)
