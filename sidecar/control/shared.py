"""What the data-plane workers and the supervisor's process share (`SIDECAR_WORKERS` > 1): one small block of
memory, mapped from a file in the run directory by every process of one sidecar.

The supervisor's process writes the engine's state and a generation that changes whenever the engine does,
and its watchdog's readings of used GPU memory (a ring: a request's GPU peak in a worker comes from the one
watchdog); each worker writes only its own slot: requests in flight and when its last one started or ended. Reads are a
few bytes from the mapping, with no system call and no lock: a worker checks the state on every request, the
supervisor sums the workers' in-flight counts when it drains.

A worker counts a request in flight before it reads the state, and the supervisor publishes a state before
it reads the counts: an unload that starts as a request arrives either sees that request or is seen by it.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from pathlib import Path
from typing import TypedDict

from sidecar.engine_state import EngineState

_STATES = list(EngineState)
_HEADER = struct.Struct("<iiq")  # state's index, idle-unloaded flag, engine generation
_SLOT = struct.Struct("<qdq")  # in flight, last start or end (monotonic), pid
_GPU_COUNT = struct.Struct("<q")  # readings written so far
_GPU = struct.Struct("<dd")  # a reading: monotonic time, used MB
GPU_READINGS = 4096  # kept: about 7 minutes at the watchdog's 100 ms


class WorkerSlot(TypedDict):
    index: int
    pid: int  # 0 while it is being replaced
    in_flight: int


class SharedState:
    def __init__(self, path: Path, workers: int, create: bool) -> None:
        self.path = path
        self.workers = workers
        self._gpu_at = _HEADER.size + workers * _SLOT.size
        size = self._gpu_at + _GPU_COUNT.size + GPU_READINGS * _GPU.size
        flags = os.O_RDWR | (os.O_CREAT | os.O_TRUNC if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        if create:
            self.publish(EngineState.IDLE, 0, idle_unloaded=False)
            for index in range(workers):
                self.reset(index)

    @classmethod
    def create(cls, path: Path, workers: int) -> SharedState:
        path.parent.mkdir(parents=True, exist_ok=True)
        return cls(path, workers, create=True)

    @classmethod
    def attach(cls, path: Path, workers: int) -> SharedState:
        return cls(path, workers, create=False)

    # -- the supervisor's side ------------------------------------------------------------------------------

    def publish(self, state: EngineState, generation: int, idle_unloaded: bool) -> None:
        _HEADER.pack_into(self._map, 0, _STATES.index(state), int(idle_unloaded), generation)

    def in_flight(self) -> int:
        return sum(self._slot(index)[0] for index in range(self.workers))

    def last_used(self) -> float:
        return max(self._slot(index)[1] for index in range(self.workers))

    def record_gpu(self, monotonic: float, used_mb: float) -> None:
        """One watchdog reading (the watchdog's thread is the only writer): the slot first, then the count."""
        (count,) = _GPU_COUNT.unpack_from(self._map, self._gpu_at)
        _GPU.pack_into(self._map, self._gpu_reading(count), monotonic, used_mb)
        _GPU_COUNT.pack_into(self._map, self._gpu_at, count + 1)

    def workers_now(self) -> list[WorkerSlot]:
        """Each worker's pid (0 while it is being replaced) and requests in flight."""
        return [
            WorkerSlot(index=index, pid=pid, in_flight=in_flight)
            for index, (in_flight, _, pid) in enumerate(self._slot(i) for i in range(self.workers))
        ]

    def reset(self, index: int, pid: int = 0) -> None:
        """A worker's slot as new: for a worker that starts, or that died with requests counted."""
        _SLOT.pack_into(self._map, self._offset(index), 0, time.monotonic(), pid)

    # -- a worker's side ----------------------------------------------------------------------------------

    def engine(self) -> tuple[EngineState, int, bool]:
        """(state, generation, whether an idle unload took the engine)."""
        state, idle_unloaded, generation = _HEADER.unpack_from(self._map, 0)
        return _STATES[state], generation, bool(idle_unloaded)

    def gpu_peak_since(self, monotonic: float) -> float | None:
        """The highest used GPU memory the watchdog read since `monotonic` (None: no reading since)."""
        (count,) = _GPU_COUNT.unpack_from(self._map, self._gpu_at)
        peak = None
        for number in range(count - 1, max(-1, count - GPU_READINGS - 1), -1):  # newest first
            at, used_mb = _GPU.unpack_from(self._map, self._gpu_reading(number))
            if at < monotonic:
                break
            peak = used_mb if peak is None else max(peak, used_mb)
        return peak

    def begin(self, index: int) -> None:
        in_flight, _, pid = self._slot(index)
        _SLOT.pack_into(self._map, self._offset(index), in_flight + 1, time.monotonic(), pid)

    def end(self, index: int) -> None:
        in_flight, _, pid = self._slot(index)
        _SLOT.pack_into(self._map, self._offset(index), in_flight - 1, time.monotonic(), pid)

    def _slot(self, index: int) -> tuple[int, float, int]:
        slot: tuple[int, float, int] = _SLOT.unpack_from(self._map, self._offset(index))
        return slot

    def _offset(self, index: int) -> int:
        return _HEADER.size + index * _SLOT.size

    def _gpu_reading(self, number: int) -> int:
        return self._gpu_at + _GPU_COUNT.size + (number % GPU_READINGS) * _GPU.size

    def close(self) -> None:
        self._map.close()
