"""GPU memory the mock engine holds on request, through PyTorch where it is installed: a known amount that
the sidecar's GPU readings can be checked against. Nothing here runs unless asked for."""

from __future__ import annotations

import importlib
from typing import Any


def _torch() -> Any:
    # Only on a machine with a GPU, only when asked: the mock needs no torch otherwise.
    return importlib.import_module("torch")


class GpuMemory:
    """Blocks of GPU memory, held here only, so that releasing one gives it back to the driver."""

    def __init__(self) -> None:
        self._held: dict[int, Any] = {}
        self._next = 0

    def hold(self, mb: float) -> int:
        torch = _torch()
        self._next += 1
        self._held[self._next] = torch.empty(int(mb * 2**20), dtype=torch.uint8, device="cuda")
        torch.cuda.synchronize()
        return self._next

    def release(self, block: int) -> None:
        torch = _torch()
        del self._held[block]  # the only reference: the tensor is freed here
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # back to the driver, not only to PyTorch's cache

    def release_all(self) -> None:
        for block in list(self._held):
            self.release(block)
