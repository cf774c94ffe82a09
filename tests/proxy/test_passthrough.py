"""Other /v1/* paths, and the headers every request takes to the engine."""

from __future__ import annotations

import json
import re

import httpx

from tests.proxy.conftest import KEY, Stack


def test_engine_never_sees_the_clients_key_and_gets_the_request_id(stack: Stack) -> None:
    for auth in ({"Authorization": f"Bearer {KEY}"}, {"X-API-Key": KEY}):
        headers = auth | {"X-Request-ID": "echo-1", "X-Custom": "kept", "Connection": "keep-alive, X-Hop", "X-Hop": "x"}
        response = httpx.post(f"{stack.url}/v1/mock/echo?a=1&b=two", content=b"raw body", headers=headers)
        assert response.status_code == 200
        seen = response.json()
        assert seen["method"] == "POST" and seen["query"] == "a=1&b=two" and seen["body"] == "raw body"
        assert seen["headers"]["x-custom"] == "kept"
        engine_id = seen["headers"]["x-request-id"]  # the client's, made unique (below)
        assert engine_id.startswith("echo-1-") and len(engine_id) == len("echo-1-") + 16
        for dropped in ("x-api-key", "x-hop"):
            assert dropped not in seen["headers"]
        assert seen["headers"]["authorization"] == f"Bearer {stack.engine_key}"  # the engine's key, not the client's
        assert KEY not in response.text
        assert response.headers["x-request-id"] == "echo-1"


def test_a_repeated_header_reaches_the_engine_repeated_and_the_sidecars_own_replace_the_clients(stack: Stack) -> None:
    headers = [
        ("Authorization", f"Bearer {KEY}"),
        ("X-Forwarded-For", "10.0.0.1"),
        ("X-Forwarded-For", "10.0.0.2"),
        ("Via", "1.1 corp-proxy"),
        ("Content-Type", "text/plain"),
    ]
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    for path, content in (("/v1/mock/echo", b"raw"), ("/v1/chat/completions", json.dumps(body).encode())):
        response = httpx.post(f"{stack.url}{path}", content=content, headers=headers, timeout=30)
        assert response.status_code == 200, response.text
        if path.endswith("echo"):
            seen = response.json()["header_list"]
            assert [value for name, value in seen if name == "x-forwarded-for"] == ["10.0.0.1", "10.0.0.2"]
            assert [value for name, value in seen if name == "content-type"] == ["text/plain"]  # not checked JSON
            (via,) = [value for name, value in seen if name == "via"]
            assert re.fullmatch(r"1\.1 corp-proxy, 1\.1 sidecar-[0-9a-f]{16}", via)  # its own entry added
            assert [name for name, _ in seen].count("authorization") == 1
        else:  # the body checked to be JSON: its type says so, in place of the client's
            seen_by_engine = httpx.get(f"{stack.engine_url}/mock/last-headers").json()
            assert seen_by_engine["content-type"] == "application/json"
            assert seen_by_engine["via"].startswith("1.1 corp-proxy, 1.1 sidecar-")


def test_passthrough_keeps_the_engines_status_and_length(stack: Stack) -> None:
    response = httpx.get(f"{stack.url}/v1/mock/echo", headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200
    assert int(response.headers["content-length"]) == len(response.content)
    missing = httpx.get(f"{stack.url}/v1/models/no-such-model", headers={"Authorization": f"Bearer {KEY}"})
    assert missing.status_code == 404  # a path it serves, and the engine's own 404 for it, in the OpenAI shape
    assert missing.json()["error"]["type"] == "NotFoundError"


def test_head_on_a_path_passed_through_is_its_get_without_the_body(stack: Stack) -> None:
    """HEAD where the engine's path is passed with GET, as the sidecar's own GET routes take it: the engine gets a
    GET (engines differ on HEAD; the answer to one has a length and no body), the client the status and headers
    without the body, and the connection goes on serving."""
    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=stack.url, headers=auth, timeout=10) as client:
        for path in ("/v1/models", "/v1/mock/echo"):
            got, head = client.get(path), client.head(path)
            assert (head.status_code, head.content) == (200, b"")
            assert head.headers["content-type"] == got.headers["content-type"]
            assert int(head.headers["content-length"]) > 0
        assert client.get("/v1/models").json()["data"]  # the same connection: nothing of a HEAD left on it


def test_passthrough_needs_the_key(stack: Stack) -> None:
    assert httpx.get(f"{stack.url}/v1/models").status_code == 401
    assert httpx.get(f"{stack.url}/v1/models", headers={"X-API-Key": "wrong"}).status_code == 403


def test_a_method_the_engines_path_is_not_passed_with_is_405_naming_those_it_is(stack: Stack) -> None:
    """As the engine itself would answer (vLLM's FastAPI: 405), and without reaching it: the methods in `Allow` are
    those its adapter passes on that path (`data_paths`); a path it passes with none stays 404, one it passes with
    any method is passed."""
    auth = {"Authorization": f"Bearer {KEY}"}
    wrong = httpx.delete(f"{stack.url}/v1/responses/resp-1", headers=auth)
    assert (wrong.status_code, wrong.headers["allow"], wrong.json()["error"]["code"]) == (
        405,
        "GET, HEAD, POST",
        "method_not_allowed",
    )
    assert "DELETE" in wrong.json()["error"]["message"]
    assert httpx.delete(f"{stack.url}/v1/no-such-path", headers=auth).status_code == 404
    assert httpx.delete(f"{stack.url}/v1/mock/echo", headers=auth).json()["method"] == "DELETE"
    assert httpx.delete(f"{stack.url}/v1/responses/resp-1").status_code == 401  # the key first, as everywhere


def test_requests_that_share_a_clients_id_reach_the_engine_under_ids_of_their_own(stack: Stack) -> None:
    """Engines key their requests by the id they are given, and two at once with one id break them (vLLM until
    vllm#27987): the engine gets the client's id with a random suffix, the client its own id back; a request
    without one goes to the engine under the sidecar's id."""
    auth = {"Authorization": f"Bearer {KEY}"}
    seen = [httpx.post(f"{stack.url}/v1/mock/echo", headers=auth | {"X-Request-ID": "retry-7"}) for _ in range(3)]
    assert [answer.headers["x-request-id"] for answer in seen] == ["retry-7"] * 3
    engine_ids = {answer.json()["headers"]["x-request-id"] for answer in seen}
    assert len(engine_ids) == 3 and all(engine_id.startswith("retry-7-") for engine_id in engine_ids)
    own = httpx.post(f"{stack.url}/v1/mock/echo", headers=auth)
    assert own.json()["headers"]["x-request-id"] == own.headers["x-request-id"]
