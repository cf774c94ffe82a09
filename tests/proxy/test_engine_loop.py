"""An external engine's URL that leads back to a sidecar: refused at load where it is the sidecar's own address,
and a request that comes round anyway (through another sidecar, or a published port) is 508 at once instead of
going round until every descriptor is taken."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import pytest

from sidecar.control.startup import leads_to_sidecar
from tests.processes import SidecarProcess

Start = Callable[..., SidecarProcess]

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def _own_addresses() -> list[str]:
    return [
        entry.address
        for entries in psutil.net_if_addrs().values()
        for entry in entries
        if entry.family == socket.AF_INET and not entry.address.startswith("127.")
    ]


@pytest.mark.parametrize(
    ("url", "host", "leads"),
    [
        ("http://127.0.0.1:8000", "127.0.0.1", True),
        ("http://localhost:8000/v1", "127.0.0.1", True),
        ("http://127.0.0.1:8001", "127.0.0.1", False),  # another port
        ("http://127.0.0.2:8000", "127.0.0.1", False),  # a loopback address the sidecar does not listen on
        ("http://127.0.0.2:8000", "0.0.0.0", True),  # every address: the whole loopback network among them
        ("http://0.0.0.0:8000", "0.0.0.0", True),
        ("http://[::1]:8000", "::", True),
        ("https://api.example.com", "0.0.0.0", False),  # port 443: not even looked up
        ("http://nowhere.invalid:8000", "0.0.0.0", False),  # no such name: whatever it is, not the sidecar
    ],
)
def test_a_url_leads_to_the_sidecar_where_it_reaches_its_own_port_and_address(url: str, host: str, leads: bool) -> None:
    assert leads_to_sidecar(url, host, 8000) is leads


def test_the_machines_own_addresses_lead_to_a_sidecar_listening_on_every_address_only() -> None:
    for address in _own_addresses():
        assert leads_to_sidecar(f"http://{address}:8000", "0.0.0.0", 8000)
        assert not leads_to_sidecar(f"http://{address}:8000", "127.0.0.1", 8000)


def test_an_external_engine_at_the_sidecars_own_url_is_a_400_that_changes_nothing(start_sidecar: Start) -> None:
    sidecar = start_sidecar()
    for url in (sidecar.url, sidecar.url.replace("127.0.0.1", "localhost") + "/v1"):
        response = sidecar.load(engine="external", model="m", url=url)
        assert response.status_code == 400, response.text
        assert response.json()["error"] | {"message": None} == {
            "message": None,
            "type": "invalid_request_error",
            "param": "url",
            "code": "engine_loop",
        }
    assert httpx.get(f"{sidecar.url}/v1/model").json()["state"] == "idle"


def test_a_request_coming_round_through_another_sidecar_is_508_at_once(tmp_path: Path, start_sidecar: Start) -> None:
    first = start_sidecar({"SIDECAR_RUN_DIR": str(tmp_path / "first")})
    second = start_sidecar({"SIDECAR_RUN_DIR": str(tmp_path / "second")})
    assert first.load(engine="external", model="m", url=second.url).status_code == 200
    assert second.load(engine="external", model="m", url=first.url).status_code == 200
    descriptors = psutil.Process(first.pid).num_fds()
    for stream in (False, True):
        started = time.monotonic()
        response = httpx.post(f"{first.url}/v1/chat/completions", json=CHAT | {"stream": stream}, timeout=30)
        assert response.status_code == 508, response.text
        assert response.json()["error"]["code"] == "engine_loop"
        assert "came back to this sidecar" in response.json()["error"]["message"]
        assert time.monotonic() - started < 5  # one round, not thousands
    assert httpx.get(f"{second.url}/v1/models", timeout=30).status_code == 508  # the engine's other paths too
    assert psutil.Process(first.pid).num_fds() < descriptors + 10  # no connection held per hop
    for sidecar in (first, second):
        assert httpx.get(f"{sidecar.url}/health").status_code == 200
