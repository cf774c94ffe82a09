"""The route table: the one URL map that routing, authentication's planes, OpenAPI, a worker's forwarding and the
metrics' labels are made from."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.routing import Route

from sidecar.server import routes
from sidecar.server.endpoint import Plane, Serves


@pytest.mark.parametrize(
    ("path", "plane"),
    [
        ("/", Plane.OPEN),
        ("/health", Plane.OPEN),
        ("/v1/chat/completions", Plane.DATA),
        ("/v1/models", Plane.DATA),
        ("/v1/models/some/model", Plane.DATA),  # the pass-through
        ("/v1/requests/abc", Plane.DATA),
        ("/v1/model", Plane.CONTROL),
        ("/v1/model/load", Plane.CONTROL),
        ("/v1/model/no-such-route", Plane.CONTROL),  # the control plane's key before its 404
        ("/v1", Plane.OPEN),
        ("/nowhere", Plane.OPEN),
    ],
)
def test_each_path_needs_the_key_of_its_plane(path: str, plane: Plane) -> None:
    assert routes.planes(metrics_require_key=False)(path) is plane


def test_the_metrics_need_a_data_key_only_when_the_setting_says_so() -> None:
    assert routes.planes(metrics_require_key=False)("/metrics") is Plane.OPEN
    assert routes.planes(metrics_require_key=True)("/metrics") is Plane.DATA


def test_a_worker_serves_the_data_plane_and_forwards_the_rest() -> None:
    async def forward(request: Any) -> Any:
        raise AssertionError

    proxy: Any = type(
        "P", (), {"generate": None, "embeddings": None, "responses": None, "messages": None, "passthrough": None}
    )()
    built = [route for route in routes.starlette_routes(proxy, forward) if isinstance(route, Route)]
    forwarded = {route.path for route in built if route.endpoint is forward}
    assert forwarded == {e.path for e in routes.ENDPOINTS if e.serves is Serves.OWNER}
    assert "/v1/model/{rest:path}" in forwarded and "/v1/chat/completions" not in forwarded
    assert built[-1].path == "/v1/{path:path}"  # the pass-through last: Starlette takes the first match


def test_the_generation_routes_are_served_before_the_router() -> None:
    proxy: Any = type("P", (), {"generate": object()})()
    assert set(routes.generation_paths(proxy)) == {"/v1/chat/completions", "/v1/completions"}
