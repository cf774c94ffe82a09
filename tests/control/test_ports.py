"""The engine's port: free when chosen, and outside the range the kernel takes outgoing connections' source ports
from, so that no connection on the machine (the readiness probe's own included) takes it before the engine binds
it."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from sidecar.control import engine
from sidecar.control.engine import free_port
from tests.processes import SidecarProcess

Start = Callable[..., SidecarProcess]


def _ephemeral(path: Path = Path("/proc/sys/net/ipv4/ip_local_port_range")) -> range:
    low, high = path.read_text().split()
    return range(int(low), int(high) + 1)


def _set_range(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, text: str) -> None:
    path = tmp_path / "ip_local_port_range"
    path.write_text(text)
    monkeypatch.setattr(engine, "_EPHEMERAL_RANGE_FILE", str(path))


def test_a_port_is_free_above_the_well_known_ones_and_outside_the_ephemeral_range() -> None:
    ephemeral = _ephemeral()
    for _ in range(200):
        port = free_port()
        assert port >= 16384 and port not in ephemeral
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # free: it binds


def test_both_sides_of_a_narrowed_range_are_used(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _set_range(monkeypatch, tmp_path, "20000\t65000\n")
    chosen = {free_port() for _ in range(300)}
    assert all(16384 <= port < 20000 or port > 65000 for port in chosen)
    assert any(port < 20000 for port in chosen) and any(port > 65000 for port in chosen)


def test_a_port_taken_is_passed_over(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Room for two ports outside the range: one held here, so the other is the one chosen, every time.
    _set_range(monkeypatch, tmp_path, "16386 65535")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 16384))
        assert {free_port() for _ in range(20)} == {16385}


@pytest.mark.parametrize("text", ["1024 65535", "not a range"])
def test_with_no_room_or_no_range_the_kernel_chooses(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, text: str
) -> None:
    _set_range(monkeypatch, tmp_path, text)
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_the_engine_a_sidecar_starts_listens_outside_the_ephemeral_range(start_sidecar: Start) -> None:
    sidecar = start_sidecar()
    for _ in range(3):
        loaded = sidecar.load(replace=True)
        assert loaded.status_code == 200, loaded.text
        assert loaded.json()["port"] not in _ephemeral()
