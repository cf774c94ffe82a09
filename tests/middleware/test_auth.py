from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from tests.apps import client_for
from tests.processes import SidecarProcess

DATA_KEYS = "data-key-one,data-key-two"
ADMIN_KEYS = "admin-key-one"
DATA_PATH = "/v1/models"  # data plane: passes auth, then 503 (no engine)
CONTROL_PATH = "/v1/model"  # control plane: the engine's status


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def api_key(key: str) -> dict[str, str]:
    return {"X-API-Key": key}


@pytest.mark.parametrize(
    ("path", "headers", "status"),
    [
        (DATA_PATH, {}, 401),
        (DATA_PATH, bearer("wrong-key"), 403),
        (DATA_PATH, api_key("wrong-key"), 403),
        (DATA_PATH, bearer("data-key-one"), 503),
        (DATA_PATH, api_key("data-key-one"), 503),
        (DATA_PATH, bearer("data-key-two"), 503),
        (DATA_PATH, api_key("data-key-two"), 503),
        (DATA_PATH, bearer("admin-key-one"), 503),
        (DATA_PATH, {"Authorization": "Basic ZGF0YS1rZXktb25l"}, 401),
        (DATA_PATH, {"Authorization": "Bearer "}, 401),
        (DATA_PATH, {"Authorization": "bearer data-key-one"}, 503),
        (DATA_PATH, {"Authorization": "Basic x", "X-API-Key": "data-key-one"}, 503),
        (DATA_PATH, bearer("data-key-one-and-more"), 403),
        (CONTROL_PATH, {}, 401),
        (CONTROL_PATH, bearer("data-key-one"), 403),
        (CONTROL_PATH, api_key("data-key-two"), 403),
        (CONTROL_PATH, bearer("admin-key-one"), 200),
        (CONTROL_PATH, api_key("admin-key-one"), 200),
        ("/health", {}, 200),
        ("/ready", {}, 503),
        ("/", {}, 200),
        ("/openapi.json", {}, 200),
        ("/health", bearer("wrong-key"), 200),
    ],
)
async def test_auth_matrix(path: str, headers: dict[str, str], status: int) -> None:
    async with client_for(api_keys=DATA_KEYS, admin_keys=ADMIN_KEYS) as client:
        response = await client.get(path, headers=headers)
    assert response.status_code == status, response.text
    if status in (401, 403):
        assert response.json()["error"]["type"] in ("authentication_error", "permission_error")


async def test_admin_keys_fall_back_to_data_keys() -> None:
    async with client_for(api_keys=DATA_KEYS) as client:
        assert (await client.get(CONTROL_PATH, headers=bearer("data-key-one"))).status_code == 200
        assert (await client.get(CONTROL_PATH, headers=bearer("wrong-key"))).status_code == 403


async def test_admin_keys_alone_protect_the_data_plane_too() -> None:
    async with client_for(admin_keys=ADMIN_KEYS) as client:
        assert (await client.get(DATA_PATH)).status_code == 401
        assert (await client.get(DATA_PATH, headers=bearer("admin-key-one"))).status_code == 503


async def test_no_keys_configured_means_no_auth_on_loopback() -> None:
    async with client_for() as client:
        assert (await client.get(DATA_PATH)).status_code == 503
        assert (await client.get(CONTROL_PATH)).status_code == 200


async def test_metrics_can_require_a_key() -> None:
    async with client_for(api_keys=DATA_KEYS, metrics_require_key=True) as client:
        assert (await client.get("/metrics")).status_code == 401
    async with client_for(api_keys=DATA_KEYS) as client:
        assert (await client.get("/metrics")).status_code != 401


def test_keys_over_real_http(start_sidecar: Callable[..., SidecarProcess]) -> None:
    sidecar = start_sidecar({"SIDECAR_API_KEYS": DATA_KEYS, "SIDECAR_ADMIN_KEYS": ADMIN_KEYS})
    with httpx.Client(base_url=sidecar.url) as client:
        assert client.get(DATA_PATH).status_code == 401
        assert client.get(DATA_PATH, headers=bearer("wrong-key")).status_code == 403
        assert client.get(DATA_PATH, headers=api_key("data-key-two")).status_code == 503
        assert client.get(CONTROL_PATH, headers=bearer("data-key-one")).status_code == 403
        assert client.get(CONTROL_PATH, headers=api_key("admin-key-one")).status_code == 200


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
async def test_generation_routes_check_the_key_then_the_body_limit(path: str) -> None:
    """The routes served before the router check keys and the body limit as the layers do, in the same order."""
    too_big = b"{" + b" " * 100 + b"}"
    async with client_for(api_keys=DATA_KEYS, admin_keys=ADMIN_KEYS, max_body_bytes=64) as client:
        assert (await client.post(path, content=too_big)).status_code == 401
        assert (await client.post(path, content=too_big, headers=bearer("wrong-key"))).status_code == 403
        assert (await client.post(path, content=too_big, headers=bearer("data-key-one"))).status_code == 413
        small = {"model": "m", "prompt": "hi"}
        assert (await client.post(path, json=small, headers=bearer("data-key-one"))).status_code == 503  # no engine
