from __future__ import annotations

from starlette.routing import Route

from sidecar import __version__
from sidecar.server.app import create_app
from sidecar.server.routes import ENDPOINTS
from sidecar.settings import load_settings
from tests.apps import client_for


async def test_root_names_the_sidecar_and_its_endpoints() -> None:
    async with client_for() as client:
        body = (await client.get("/")).json()
    assert body["name"] == "sidecar"
    assert body["version"] == __version__
    assert "GET /health" in body["endpoints"] and "POST /v1/chat/completions" in body["endpoints"]


async def test_health_is_200_with_engine_state() -> None:
    async with client_for() as client:
        response = await client.get("/health")
    assert response.status_code == 200
    assert response.json()["engine"]["state"] == "idle"


async def test_ready_is_503_until_an_engine_is_ready() -> None:
    async with client_for() as client:
        response = await client.get("/ready")
    assert response.status_code == 503
    assert response.headers["retry-after"]
    assert "state: idle" in response.json()["error"]["message"]


async def test_openapi_describes_every_route_the_app_serves() -> None:
    app = create_app(load_settings(None))
    served = {
        (method, route.path)
        for route in app.routes
        if isinstance(route, Route) and "{" not in route.path
        for method in (route.methods or ()) - {"HEAD"}
    }
    async with client_for() as client:
        document = (await client.get("/openapi.json")).json()
    documented = {(m.upper(), path) for path, ops in document["paths"].items() for m in ops}
    assert documented == {(method, e.path) for e in ENDPOINTS if e.summary for method in e.methods}
    assert served <= documented
    assert document["openapi"].startswith("3.")
    assert document["paths"]["/health"]["get"]["security"] == []


async def test_cors_preflight_from_an_allowed_origin() -> None:
    async with client_for(cors_origins="https://app.example.com", api_keys="k-123456") as client:
        allowed = await client.options(
            "/v1/chat/completions",
            headers={"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST"},
        )
        refused = await client.options(
            "/v1/chat/completions",
            headers={"Origin": "https://evil.example.com", "Access-Control-Request-Method": "POST"},
        )
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://app.example.com"
    assert "access-control-allow-origin" not in refused.headers
