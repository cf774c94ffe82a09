"""Hostile input against a real sidecar with the mock engine loaded: schemathesis over the sidecar's own OpenAPI
description (every operation, valid and invalid input, with an admin key), then hand-made cases no schema
describes.

After each, the sidecar must answer no 5xx of its own (502, 503 and 504 name the engine), every error must be an
OpenAI error body, and the sidecar must still be healthy with the engine in a known state.
"""

from __future__ import annotations

import itertools
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

from tests.processes import SidecarProcess, running

pytestmark = pytest.mark.slow

DATA_KEY = "fuzz-data-key-0123"
ADMIN_KEY = "fuzz-admin-key-4567"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
DATA = {"Authorization": f"Bearer {DATA_KEY}"}
STATES = {"idle", "loading", "ready", "unloading", "failed"}
EXAMPLES = 25  # per operation and mode (valid and invalid input): several hundred requests in all
ENGINE_STATUSES = {502, 503, 504}  # the engine's failure or absence, never the sidecar's own


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProcess]:
    env = {
        "SIDECAR_API_KEYS": DATA_KEY,
        "SIDECAR_ADMIN_KEYS": ADMIN_KEY,
        "SIDECAR_AUTOLOAD_ENGINE": "mock",
        "SIDECAR_AUTOLOAD_MODEL": "mock-model",
        "SIDECAR_AUTOLOAD_ARGS": json.dumps({"ttft-ms": 1, "itl-ms": 1, "tokens": 4}),
        "SIDECAR_DRAIN_TIMEOUT_S": "0.5",
        "SIDECAR_KILL_GRACE_S": "0.5",
        "SIDECAR_STARTUP_TIMEOUT_S": "5",
        "SIDECAR_UPSTREAM_FIRST_TOKEN_TIMEOUT_S": "5",
        "SIDECAR_MAX_BODY_BYTES": str(1024 * 1024),
    }
    with running(tmp_path_factory.mktemp("fuzz"), env, ready=True) as process:
        yield process


def assert_sound(response: httpx.Response | Any, what: str) -> None:
    """No 5xx of the sidecar's own, and every error in the OpenAI shape."""
    status = response.status_code
    assert status < 500 or status in ENGINE_STATUSES, f"{what}: {status} {response.text[:300]}"
    if status >= 400:
        body = response.json()
        assert isinstance(body["error"]["message"], str) and body["error"]["type"], f"{what}: {body}"
        assert body["error"].get("code") != "internal_error", f"{what}: {body}"


def assert_still_standing(sidecar: SidecarProcess) -> None:
    assert sidecar.process.poll() is None, sidecar.output()[-2000:]
    assert httpx.get(f"{sidecar.url}/health").status_code == 200
    assert httpx.get(f"{sidecar.url}/v1/model", headers=ADMIN).json()["state"] in STATES


def test_schemathesis_finds_no_error_of_the_sidecars_own(sidecar: SidecarProcess) -> None:
    # Driven by hand rather than through schemathesis' pytest plugin: its lazy loading does not run on pytest 9.
    api = schemathesis.openapi.from_dict(httpx.get(f"{sidecar.url}/openapi.json").json())
    operations = [result.ok() for result in api.get_all_operations()]
    labels = {operation.label for operation in operations}
    assert {"POST /v1/model/load", "POST /v1/model/unload", "POST /v1/chat/completions", "GET /v1/model"} <= labels

    with requests.Session() as session:  # one session, closed at the end: no connection left to the collector
        for operation, mode in itertools.product(operations, list(schemathesis.GenerationMode)):

            @given(case=operation.as_strategy(mode))
            @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            def fuzz(case: Any) -> None:
                response = case.call(base_url=sidecar.url, session=session, headers=ADMIN, timeout=30)
                assert_sound(response, f"{case.method} {case.formatted_path}")

            try:
                fuzz()
            except Unsatisfiable:  # an operation with no input to get wrong (GET /health): no invalid case exists
                assert mode is schemathesis.GenerationMode.NEGATIVE
            assert_still_standing(sidecar)


def _raw(sidecar: SidecarProcess, request: bytes) -> bytes:
    """Bytes sent as they are, on a socket of their own: what no HTTP client library would send."""
    with socket.create_connection(("127.0.0.1", sidecar.port), timeout=10) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _status(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.1 ") else 0


CHAT = "/v1/chat/completions"


@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("invalid UTF-8", b'{"model": "mock-model", "messages": [{"role": "user", "content": "\xff\xfe"}]}'),
        ("JSON nested 100k deep", b"[" * 100_000 + b"]" * 100_000),
        (
            "a message nested just under the parser's limit",
            b'{"model": "mock-model", "messages": ' + b"[" * 980 + b"]" * 980 + b"}",
        ),
        ("object nested 100k deep", b'{"a":' * 100_000 + b"1" + b"}" * 100_000),
        ("not JSON", b"\x00\x01\x02 not json"),
        ("a JSON string", b'"hello"'),
        ("a huge number", b'{"model": "mock-model", "max_tokens": 1' + b"0" * 5000 + b"}"),
        # What Python's own parser takes and JSON does not: a lone surrogate cannot be written on in UTF-8.
        ("a lone surrogate", b'{"model": "mock-model", "stream": true, "messages": [{"content": "\\ud800"}]}'),
        ("NaN", b'{"model": "mock-model", "messages": [], "temperature": NaN}'),
    ],
)
def test_hostile_bodies_get_a_clear_400(sidecar: SidecarProcess, name: str, body: bytes) -> None:
    for path, headers in ((CHAT, DATA), ("/v1/model/load", ADMIN)):
        response = httpx.post(f"{sidecar.url}{path}", content=body, headers=headers, timeout=30)
        assert response.status_code in (400, 413), f"{name} to {path}: {response.status_code} {response.text[:200]}"
        assert_sound(response, name)
    assert_still_standing(sidecar)


def test_a_request_with_both_content_length_and_transfer_encoding_is_refused(sidecar: SidecarProcess) -> None:
    body = b'{"model": "mock-model", "messages": []}'
    smuggled = (
        (
            f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {DATA_KEY}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nTransfer-Encoding: chunked\r\n\r\n"
        ).encode()
        + f"{len(body):x}\r\n".encode()
        + body
        + b"\r\n0\r\n\r\nGET /v1/model HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    answer = _raw(sidecar, smuggled)
    assert _status(answer) == 400, answer[:300]
    assert _openai_error(answer)["code"] == "invalid_http"
    assert b'"state"' not in answer, "a second request was smuggled through to the control plane"
    assert_still_standing(sidecar)


def _openai_error(raw: bytes) -> dict[str, Any]:
    error: dict[str, Any] = json.loads(raw.partition(b"\r\n\r\n")[2])["error"]
    assert isinstance(error["message"], str) and error["type"] == "invalid_request_error", error
    return error


@pytest.mark.parametrize(
    "path",
    [
        "/v1//model/load",
        "/v1/chat/%2e%2e/model/load",
        "/v1/chat/../model/load",
        "/v1%2Fmodel/load",
        "/v1/model%2Fload",
        "//v1/model/load",
        "/v1/./model/load",
        "/v1/models/../model/unload",
        "/V1/model/unload",
    ],
)
def test_path_tricks_never_reach_the_control_plane_without_an_admin_key(sidecar: SidecarProcess, path: str) -> None:
    before = httpx.get(f"{sidecar.url}/v1/model", headers=ADMIN).json()
    body = json.dumps({"engine": "mock", "model": "hijacked", "replace": True}).encode()
    request = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {DATA_KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    answer = _raw(sidecar, request)
    assert _status(answer) != 200 or b'"state"' not in answer, answer[:300]
    after = httpx.get(f"{sidecar.url}/v1/model", headers=ADMIN).json()
    assert (after["model"], after["pid"]) == (before["model"], before["pid"])
    assert_still_standing(sidecar)


def test_the_engine_is_in_a_known_state_after_it_all(sidecar: SidecarProcess, tmp_path: Path) -> None:
    state = httpx.get(f"{sidecar.url}/v1/model", headers=ADMIN).json()
    assert state["state"] in STATES
    reload = {"engine": "mock", "model": "mock-model", "replace": True}
    assert httpx.post(f"{sidecar.url}/v1/model/load", json=reload, headers=ADMIN, timeout=30).status_code == 200
    chat = {"model": "mock-model", "messages": [{"role": "user", "content": "still there?"}]}
    assert httpx.post(f"{sidecar.url}{CHAT}", json=chat, headers=DATA, timeout=30).status_code == 200
