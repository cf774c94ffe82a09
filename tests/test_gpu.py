"""NVML paths with a scripted fake `pynvml`: readings, per-request peak and delta, errors, no library."""

from __future__ import annotations

import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import structlog

from sidecar.settings import load_settings
from sidecar.telemetry.gpu import MB, Gpus, on_gpu, processes_memory_mb, visible_devices
from sidecar.telemetry.service import Telemetry


class NVMLError(Exception):
    pass


@dataclass
class FakeNvml:
    """Two GPUs; GPU 0's used memory follows `curve` (MB), one value per reading, the last one repeated."""

    curve: list[float] = field(default_factory=lambda: [1000.0])
    fail_reads: bool = False
    fail_init: bool = False
    processes: dict[int, list[tuple[int, int | None]]] = field(default_factory=dict)
    reads: int = 0
    NVMLError: type[Exception] = NVMLError

    def module(self) -> types.ModuleType:
        module = types.ModuleType("pynvml")
        for name in dir(self):
            if name.startswith("nvml") or name == "NVMLError":
                setattr(module, name, getattr(self, name))
        return module

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise NVMLError("Driver Not Loaded")

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> int:
        return int(uuid.removeprefix("GPU-fake-"))

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return f"GPU-fake-{handle}"

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        if self.fail_reads:
            raise NVMLError("GPU is lost")
        if handle == 0:
            used = self.curve[min(self.reads, len(self.curve) - 1)]
            self.reads += 1
        else:
            used = 500.0
        return types.SimpleNamespace(used=int(used * MB), total=80_000 * MB)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        return types.SimpleNamespace(gpu=37)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[Any]:
        return [types.SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in self.processes.get(handle, [])]


@pytest.fixture
def fake() -> Iterator[FakeNvml]:
    yield FakeNvml()


def test_readings_of_every_visible_gpu(fake: FakeNvml) -> None:
    fake.processes = {0: [(101, 300 * MB), (102, None)]}
    gpus = Gpus(fake.module(), environ={})
    readings = gpus.read()
    assert readings is not None and [r.index for r in readings] == [0, 1]
    assert (readings[0].used_mb, readings[0].total_mb, readings[0].utilization_pct) == (1000.0, 80_000.0, 37.0)
    assert readings[0].processes_mb == {101: 300.0, 102: None}
    assert processes_memory_mb(readings, {101, 999}) == 300.0
    assert processes_memory_mb(readings, {999}) is None
    assert processes_memory_mb(readings, {101, 102}) is None  # the driver does not say for 102: no partial sum
    assert on_gpu(readings, {102}) and not on_gpu(readings, {999})


@pytest.mark.parametrize(
    ("environ", "indices"),
    [
        ({"CUDA_VISIBLE_DEVICES": "1"}, [1]),
        ({"CUDA_VISIBLE_DEVICES": "GPU-fake-1,0"}, [1, 0]),
        ({"NVIDIA_VISIBLE_DEVICES": "0"}, [0]),
        ({"NVIDIA_VISIBLE_DEVICES": "all"}, [0, 1]),
        ({"CUDA_VISIBLE_DEVICES": ""}, None),
    ],
)
def test_only_the_visible_gpus_are_read(fake: FakeNvml, environ: dict[str, str], indices: list[int] | None) -> None:
    readings = Gpus(fake.module(), environ=environ).read()
    assert (None if readings is None else [r.index for r in readings]) == indices


def test_visible_devices_parsing() -> None:
    assert visible_devices({}) is None
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "0, 2"}) == ["0", "2"]
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "none"}) == []


def test_request_window_peak_and_delta_follow_the_memory_curve(fake: FakeNvml) -> None:
    # The request starts at 1000 MB; the watchdog samples 1800 and 2600 during it; it ends at 1200 MB.
    fake.curve = [1000.0, 1800.0, 2600.0, 1200.0]
    telemetry = Telemetry(
        load_settings(None), Gpus(fake.module(), environ={"CUDA_VISIBLE_DEVICES": "0"}), lambda: None, None
    )
    window = telemetry.window()
    telemetry.watchdog._samples.append(telemetry.watchdog.sample())
    telemetry.watchdog._samples.append(telemetry.watchdog.sample())
    assert telemetry.gpu_memory(window) == (2600.0, 200.0)


def test_nvml_errors_are_tolerated(fake: FakeNvml) -> None:
    gpus = Gpus(fake.module(), environ={})
    fake.fail_reads = True
    assert gpus.read() is None and gpus.used_mb() is None
    telemetry = Telemetry(load_settings(None), gpus, lambda: None, None)
    assert telemetry.gpu_memory(telemetry.window()) == (None, None)
    assert telemetry.watchdog.sample().gpus is None


def test_no_driver_or_no_library_means_null_gpu_fields_and_one_warning(
    fake: FakeNvml, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.fail_init = True
    with structlog.testing.capture_logs() as logs:
        without_driver = Gpus(fake.module(), environ={})
        telemetry = Telemetry(load_settings(None), without_driver, lambda: None, None)
        assert telemetry.window() is None and telemetry.gpu_memory(None) == (None, None)
        assert telemetry.watchdog.sample().gpus is None
    assert [entry["event"] for entry in logs] == ["gpu_unavailable"]
    assert "Driver Not Loaded" in logs[0]["reason"]

    monkeypatch.setattr("sidecar.telemetry.gpu._load_nvml", lambda: None)
    with structlog.testing.capture_logs() as logs:
        assert Gpus().available is False
    assert [entry["event"] for entry in logs] == ["gpu_unavailable"]
    assert "not installed" in logs[0]["reason"]
