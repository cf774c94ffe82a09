"""Every error the sidecar makes, over real HTTP, in the OpenAI shape."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from sidecar.errors import engine_error_body
from tests.processes import SidecarProcess, running

KEY = "data-key-0123"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProcess]:
    env = {"SIDECAR_API_KEYS": KEY, "SIDECAR_MAX_BODY_BYTES": "1024"}
    with running(tmp_path_factory.mktemp("errors"), env) as process:
        yield process


def assert_openai_error(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str)
    return error  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object, not an array"),
        (b'"text"', "must be a JSON object, not a string"),
        (b"null", "must be a JSON object, not null"),
        (b"1e3", "must be a JSON object, not a number"),
        (b"true", "must be a JSON object, not a boolean"),
    ],
)
def test_bad_body_is_400(sidecar: SidecarProcess, content: bytes, fragment: str) -> None:
    response = httpx.post(f"{sidecar.url}/v1/chat/completions", content=content, headers=AUTH)
    error = assert_openai_error(response, 400)
    assert fragment in str(error["message"])
    assert error["type"] == "invalid_request_error"


def test_missing_key_is_401(sidecar: SidecarProcess) -> None:
    error = assert_openai_error(httpx.post(f"{sidecar.url}/v1/chat/completions", json={}), 401)
    assert error["type"] == "authentication_error"


def test_wrong_key_is_403(sidecar: SidecarProcess) -> None:
    response = httpx.post(f"{sidecar.url}/v1/chat/completions", json={}, headers={"X-API-Key": "nope-nope"})
    error = assert_openai_error(response, 403)
    assert error["code"] == "invalid_api_key"


def test_unknown_path_is_404(sidecar: SidecarProcess) -> None:
    error = assert_openai_error(httpx.get(f"{sidecar.url}/no/such/path"), 404)
    assert "/no/such/path" in str(error["message"])


def test_wrong_method_is_405(sidecar: SidecarProcess) -> None:
    assert_openai_error(httpx.delete(f"{sidecar.url}/health"), 405)


def test_a_wrong_method_on_an_openai_route_is_405_naming_the_right_one(sidecar: SidecarProcess) -> None:
    """`GET /v1/chat/completions` and the like are 405 with `Allow` (no engine needed), as the engines answer them,
    not taken for one of the engine's other paths; the key is checked first, as for every route."""
    for method, path, allowed in [
        ("GET", "/v1/chat/completions", "POST"),
        ("PUT", "/v1/completions", "POST"),
        ("GET", "/v1/embeddings", "POST"),
        ("GET", "/v1/responses", "POST"),
        ("POST", "/v1/models", "GET, HEAD"),
        ("DELETE", "/v1/requests/some-id", "GET, HEAD"),
    ]:
        answer = httpx.request(method, f"{sidecar.url}{path}", headers=AUTH)
        error = assert_openai_error(answer, 405)
        assert (error["code"], answer.headers["allow"]) == ("method_not_allowed", allowed), (method, path)
        assert f"method {method} is not allowed on {path}" == error["message"]
        assert httpx.request(method, f"{sidecar.url}{path}").status_code == 401


def test_body_over_limit_is_413(sidecar: SidecarProcess) -> None:
    response = httpx.post(f"{sidecar.url}/v1/chat/completions", content=b"{" + b" " * 2048 + b"}", headers=AUTH)
    error = assert_openai_error(response, 413)
    assert "1024" in str(error["message"])


def test_no_engine_is_503_with_retry_after(sidecar: SidecarProcess) -> None:
    response = httpx.post(f"{sidecar.url}/v1/chat/completions", json={"model": "m", "messages": []}, headers=AUTH)
    error = assert_openai_error(response, 503)
    assert int(response.headers["retry-after"]) > 0
    assert "no model is loaded" in str(error["message"])


def test_bad_body_is_400_before_the_missing_engine(sidecar: SidecarProcess) -> None:
    response = httpx.post(f"{sidecar.url}/v1/completions", content=b"nope", headers=AUTH)
    assert_openai_error(response, 400)


def test_sidecar_survives_every_error(sidecar: SidecarProcess) -> None:
    """Each kind of bad request in a row, on its own: every one answered, and the sidecar still serves after."""
    url = f"{sidecar.url}/v1/chat/completions"
    answers = [
        httpx.post(url, content=b"{not json", headers=AUTH).status_code,
        httpx.post(url, content=b"[1]", headers=AUTH).status_code,
        httpx.post(url, json={}).status_code,
        httpx.post(url, json={}, headers={"X-API-Key": "nope-nope"}).status_code,
        httpx.post(url, content=b"{" + b" " * 2048 + b"}", headers=AUTH).status_code,
        httpx.delete(f"{sidecar.url}/health").status_code,
        httpx.get(f"{sidecar.url}/no/such/path").status_code,
    ]
    assert answers == [400, 400, 401, 403, 413, 405, 404]
    assert sidecar.process.poll() is None
    assert httpx.get(f"{sidecar.url}/health").status_code == 200


@pytest.mark.parametrize(
    ("status", "raw", "expected"),
    [
        (  # TGI
            422,
            b'{"error":"Input validation error: `inputs` must not be empty","error_type":"validation"}',
            ("Input validation error: `inputs` must not be empty", "validation", None, None),
        ),
        (  # older vLLM: flat, with the status as an int code
            400,
            b'{"object":"error","message":"max_tokens is too large","type":"BadRequestError","param":null,"code":400}',
            ("max_tokens is too large", "BadRequestError", None, None),
        ),
        (  # llama.cpp
            400,
            b'{"error":{"code":400,"message":"context too long","type":"exceed_context_size_error"}}',
            ("context too long", "exceed_context_size_error", None, None),
        ),
        (  # already OpenAI's shape: kept as it is
            404,
            b'{"error":{"message":"no model x","type":"invalid_request_error",'
            b'"param":"model","code":"model_not_found"}}',
            ("no model x", "invalid_request_error", "model", "model_not_found"),
        ),
        (500, b"Internal Server Error", ("Internal Server Error", "server_error", None, None)),
        (502, b"", ("the engine answered 502", "server_error", None, None)),
        (422, b'{"detail":"field required"}', ("field required", "invalid_request_error", None, None)),
    ],
)
def test_engine_errors_are_brought_to_the_openai_shape(
    status: int, raw: bytes, expected: tuple[str, str, str | None, str | None]
) -> None:
    error = engine_error_body(status, raw)["error"]
    assert (error["message"], error["type"], error["param"], error["code"]) == expected


def test_what_an_engine_says_beside_openais_fields_is_kept() -> None:
    raw = (
        b'{"error":{"code":400,"message":"request (2024 tokens) exceeds the available context size (256 tokens)",'
        b'"type":"exceed_context_size_error","n_prompt_tokens":2024,"n_ctx":256}}'
    )
    assert engine_error_body(400, raw)["error"] == {
        "message": "request (2024 tokens) exceeds the available context size (256 tokens)",
        "type": "exceed_context_size_error",
        "param": None,
        "code": None,
        "n_prompt_tokens": 2024,
        "n_ctx": 256,
    }
    flat = b'{"object":"error","message":"too large","type":"BadRequestError","param":null,"code":400}'  # older vLLM
    assert set(engine_error_body(400, flat)["error"]) == {"message", "type", "param", "code"}


def test_every_error_code_the_sidecar_makes_is_in_the_reference() -> None:
    """Clients branch on `code`: each one the code can make (an error class's default, or one passed by name) is
    named in docs/ (reliability's and the control plane's error tables, or beside the feature that makes it)."""
    root = Path(__file__).parents[1]
    source = "".join(path.read_text() for folder in ("sidecar", "engines") for path in (root / folder).rglob("*.py"))
    codes = set(re.findall(r'(?:default_code = |code=)"([a-z_]+)"', source))
    docs = "".join(path.read_text() for path in (root / "docs").glob("*.md"))
    assert len(codes) > 20
    assert sorted(code for code in codes if f"`{code}`" not in docs) == []
