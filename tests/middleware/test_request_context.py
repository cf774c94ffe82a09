from __future__ import annotations

import json

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from sidecar import logs
from sidecar.logs import configure_logging
from sidecar.redaction import Redactor
from sidecar.server.request_context import RequestContextMiddleware
from sidecar.settings import load_settings
from tests.apps import client_for


async def test_new_request_id_on_every_response() -> None:
    async with client_for() as client:
        first = await client.get("/health")
        second = await client.get("/nope")
    ids = [first.headers["x-request-id"], second.headers["x-request-id"]]
    assert all(len(i) == 32 for i in ids)
    assert ids[0] != ids[1]


async def test_client_request_id_is_kept() -> None:
    async with client_for() as client:
        response = await client.get("/ready", headers={"X-Request-ID": "orchestrator-42.a:b"})
    assert response.headers["x-request-id"] == "orchestrator-42.a:b"


@pytest.mark.parametrize("bad", ["x" * 129, "has space", "-leading-dash", 'quote"d', "ünïcode"])
async def test_unsafe_client_request_id_is_replaced(bad: str) -> None:
    async with client_for() as client:
        response = await client.get("/health", headers={"X-Request-ID": bad.encode()})
    assert response.headers["x-request-id"] != bad
    assert len(response.headers["x-request-id"]) == 32


async def test_unexpected_exception_is_500_without_traceback_and_logged_with_request_id(
    capfd: pytest.CaptureFixture[str],
) -> None:
    configure_logging(load_settings(None, log_format="json"), Redactor())

    async def broken(scope: Scope, receive: Receive, send: Send) -> None:
        secret_local = "never-in-the-body"  # noqa: F841
        raise RuntimeError("database exploded at /internal/path")

    app = RequestContextMiddleware(broken)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://sidecar") as client:
        response = await client.get("/anything", headers={"X-Request-ID": "req-500"})

    assert response.status_code == 500
    assert response.headers["x-request-id"] == "req-500"
    assert response.json() == {
        "error": {"message": "internal server error", "type": "server_error", "param": None, "code": "internal_error"}
    }
    logs.flush_logs()  # written by the log thread: all of it before reading
    records = [json.loads(line) for line in capfd.readouterr().err.splitlines()]
    error = next(r for r in records if r["event"] == "unhandled_error")
    assert error["request_id"] == "req-500"
    assert error["level"] == "error"
    assert error["path"] == "/anything"
    assert "database exploded" in json.dumps(error["exception"])
    assert "never-in-the-body" not in json.dumps(records)  # no locals in tracebacks
    access = next(r for r in records if r["event"] == "request")
    assert (access["status"], access["request_id"]) == (500, "req-500")
