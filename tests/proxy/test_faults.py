"""Faults on either side of the proxy: a client that leaves, an engine that errs, dies, stalls or is gone."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, ClassVar

import httpx
import openai
import pytest

from tests.fake_engine import FakeEngine, serving
from tests.processes import SidecarProcess, free_port, wait_until
from tests.proxy.conftest import AUTH, KEY, MESSAGES, MODEL, Stack, events, in_front_of, sample_value, samples

CHAT = "/v1/chat/completions"


def test_client_leaving_a_stream_cancels_the_engines_request(stack: Stack) -> None:
    before = stack.engine_stats()["cancelled"]
    body = {"model": MODEL, "messages": MESSAGES, "stream": True, "mock": {"ttft_ms": 0, "itl_ms": 50, "tokens": 400}}
    with (
        httpx.Client(timeout=30) as client,
        client.stream("POST", stack.url + CHAT, json=body, headers=AUTH | {"X-Request-ID": "leaving-1"}) as response,
    ):
        for count, _ in enumerate(response.iter_lines()):
            if count == 6:
                break  # leaves with about 20 seconds of tokens still to come
    wait_until(lambda: stack.engine_stats()["cancelled"] == before + 1, timeout_s=2)
    wait_until(lambda: stack.record("leaving-1").get("client_disconnected") is True, timeout_s=2)
    assert stack.engine_stats()["in_flight"] == 0


def test_client_leaving_before_its_body_is_sent_is_logged_as_nginx_does_not_as_an_error(stack: Stack) -> None:
    """Headers, half a body, then gone: nothing to answer; the access line and the counters say 499 (nginx's
    "client closed request"), not a 500 of the sidecar's with a traceback."""
    before = samples(stack)
    host, port = stack.url.removeprefix("http://").split(":")
    paths = (CHAT, "/v1/embeddings")  # a generation route (served outside Starlette) and a Starlette route
    for path in paths:
        with socket.create_connection((host, int(port))) as connection:
            connection.sendall(
                f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"model":'.encode()
            )

    def left(path: str) -> bool:
        return any(
            "[sidecar.access]" in line and f"path={path} " in line and "status=499" in line
            for line in stack.sidecar.output().splitlines()
            if "client_disconnected=True" in line
        )

    wait_until(lambda: all(left(path) for path in paths), timeout_s=5)
    assert "unhandled_error" not in stack.sidecar.output()
    after = samples(stack)
    for path in paths:
        labels = {"route": path, "model": "", "engine": ""}
        counted = sample_value(after, "sidecar_requests_total", status="4xx", **labels)
        assert counted == sample_value(before, "sidecar_requests_total", status="4xx", **labels) + 1
        assert sample_value(after, "sidecar_requests_total", status="5xx", **labels) == 0
    assert stack.client().chat.completions.create(model=MODEL, messages=MESSAGES).choices  # still serving


def test_client_giving_up_on_a_non_streaming_request_cancels_it_too(stack: Stack) -> None:
    before = stack.engine_stats()["cancelled"]
    body = {"model": MODEL, "messages": MESSAGES, "mock": {"ttft_ms": 0, "itl_ms": 50, "tokens": 400}}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(stack.url + CHAT, json=body, headers=AUTH, timeout=0.5)
    wait_until(lambda: stack.engine_stats()["cancelled"] == before + 1, timeout_s=2)


@pytest.mark.parametrize(
    ("shape", "status", "sdk_error"),
    [
        ("tgi", 422, openai.UnprocessableEntityError),
        ("vllm", 400, openai.BadRequestError),
        ("text", 500, openai.InternalServerError),
    ],
)
def test_engine_errors_keep_their_status_in_the_openai_shape(
    stack: Stack, shape: str, status: int, sdk_error: type[openai.APIStatusError]
) -> None:
    mock = {"error": {"status": status, "shape": shape, "message": f"the engine says no ({shape})"}}
    for stream in (False, True):
        response = httpx.post(
            stack.url + CHAT, json={"messages": MESSAGES, "stream": stream, "mock": mock}, headers=AUTH
        )
        assert response.status_code == status
        error = response.json()["error"]
        assert error["message"] == f"the engine says no ({shape})"
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] is None or isinstance(error["code"], str)
    with pytest.raises(sdk_error, match=r"the engine says no"):
        stack.client().chat.completions.create(model=MODEL, messages=MESSAGES, extra_body={"mock": mock})  # type: ignore[arg-type]


def test_engine_dying_mid_stream_ends_it_with_an_error_event_then_done(own_stack: Callable[..., Stack]) -> None:
    stack = own_stack()
    body = {"model": MODEL, "messages": MESSAGES, "stream": True, "mock": {"itl_ms": 20, "die_after": 3}}
    with httpx.stream("POST", stack.url + CHAT, json=body, headers=AUTH, timeout=30) as response:
        assert response.status_code == 200
        received = events(response.read())
        request_id = response.headers["x-request-id"]
    assert received[-1] == b"data: [DONE]"
    error = json.loads(received[-2].removeprefix(b"data: "))["error"]
    assert error["type"] == "server_error" and error["code"] == "engine_error"

    # The status said 200: the access line and the record say what cut the stream.
    def access_line() -> str | None:
        lines = stack.sidecar.output().splitlines()
        return next((line for line in lines if f"request_id={request_id}" in line and "[sidecar.access]" in line), None)

    wait_until(lambda: access_line() is not None, timeout_s=5)
    assert "error=engine_error" in (access_line() or "")
    assert httpx.get(f"{stack.url}/v1/requests/{request_id}", headers=AUTH).json()["error"] == "engine_error"
    assert sum(b'"content":"' in e and b'"content":""' not in e for e in received) == 3
    wait_until(lambda: httpx.get(f"{stack.url}/v1/model", headers=AUTH).json()["state"] == "failed", timeout_s=2)
    refused = httpx.post(stack.url + CHAT, json={"messages": MESSAGES}, headers=AUTH)
    assert refused.status_code == 503 and "Retry-After" in refused.headers

    reload = {"engine": "mock", "model": MODEL, "replace": True}
    assert httpx.post(f"{stack.url}/v1/model/load", json=reload, headers=AUTH, timeout=30).status_code == 200
    body = {"messages": MESSAGES, "mock": {"die_after": 0}}
    died = httpx.post(stack.url + CHAT, json=body, headers=AUTH, timeout=30)
    assert died.status_code == 502 and died.json()["error"]["code"] == "engine_error"


def test_engine_refusing_connections_is_a_502(start_sidecar: Callable[..., SidecarProcess]) -> None:
    sidecar = start_sidecar({"SIDECAR_API_KEYS": KEY})
    port = free_port()
    engine = subprocess.Popen([sys.executable, "-m", "engines.mock_server", "--port", str(port)])
    try:
        load = {"engine": "external", "model": MODEL, "url": f"http://127.0.0.1:{port}"}
        deadline = time.monotonic() + 20
        while httpx.post(f"{sidecar.url}/v1/model/load", json=load, headers=AUTH, timeout=30).status_code != 200:
            assert time.monotonic() < deadline, "the external engine never became ready"
    finally:
        engine.kill()
        engine.wait()
    started = time.monotonic()
    response = httpx.post(f"{sidecar.url}{CHAT}", json={"messages": MESSAGES}, headers=AUTH, timeout=30)
    assert response.status_code == 502
    assert response.json()["error"]["message"].startswith("could not connect to the engine")
    assert time.monotonic() - started < 2


def test_timeouts_answer_504_or_end_the_stream_with_a_timeout_event(own_stack: Callable[..., Stack]) -> None:
    stack = own_stack(
        {"SIDECAR_UPSTREAM_FIRST_TOKEN_TIMEOUT_S": "0.5", "SIDECAR_UPSTREAM_INTER_TOKEN_TIMEOUT_S": "0.5"}
    )
    cancelled = stack.engine_stats()["cancelled"]

    started = time.monotonic()
    slow = {"messages": MESSAGES, "mock": {"ttft_ms": 5000}}
    response = httpx.post(stack.url + CHAT, json=slow, headers=AUTH, timeout=30)
    assert response.status_code == 504 and response.json()["error"]["type"] == "timeout_error"
    assert 0.4 < time.monotonic() - started < 2

    for mock in ({"ttft_ms": 5000}, {"itl_ms": 5, "stall_after": 2}):  # no first token; no token after the second
        body = {"messages": MESSAGES, "stream": True, "mock": mock}
        with httpx.stream("POST", stack.url + CHAT, json=body, headers=AUTH, timeout=30) as streamed:
            received = events(streamed.read())
        assert received[-1] == b"data: [DONE]"
        assert json.loads(received[-2].removeprefix(b"data: "))["error"]["code"] == "engine_timeout"
    # Every timed-out request was closed on the engine, not left generating.
    wait_until(lambda: stack.engine_stats()["in_flight"] == 0, timeout_s=2)
    assert stack.engine_stats()["cancelled"] == cancelled + 3


def test_the_inter_token_timeout_starts_with_output_and_counts_from_the_last_read(
    own_stack: Callable[..., Stack],
) -> None:
    # A first token slower than the inter-token timeout is waited for (the first-token timeout holds until output
    # begins); once tokens flow, a stall is cut the inter-token timeout after the last one, not sooner.
    stack = own_stack({"SIDECAR_UPSTREAM_FIRST_TOKEN_TIMEOUT_S": "10", "SIDECAR_UPSTREAM_INTER_TOKEN_TIMEOUT_S": "0.6"})
    body = {"messages": MESSAGES, "stream": True, "max_tokens": 4, "mock": {"ttft_ms": 1500, "itl_ms": 300}}
    with httpx.stream("POST", stack.url + CHAT, json=body, headers=AUTH, timeout=30) as streamed:
        received = events(streamed.read())
    chunks = [json.loads(event.removeprefix(b"data: ")) for event in received[:-1]]
    assert received[-1] == b"data: [DONE]" and not any("error" in chunk for chunk in chunks)
    assert [chunk["choices"][0]["finish_reason"] for chunk in chunks if chunk["choices"]][-1] == "length"

    body = {"messages": MESSAGES, "stream": True, "mock": {"ttft_ms": 1500, "itl_ms": 100, "stall_after": 3}}
    with httpx.stream("POST", stack.url + CHAT, json=body, headers=AUTH, timeout=30) as streamed:
        arrivals: list[tuple[float, bytes]] = []
        for line in streamed.iter_lines():
            if line:
                arrivals.append((time.monotonic(), line.encode()))
    assert json.loads(arrivals[-2][1].removeprefix(b"data: "))["error"]["code"] == "engine_timeout"
    stalled_for = arrivals[-2][0] - arrivals[-3][0]  # from the last token to the timeout's event
    assert 0.55 < stalled_for < 2.5


async def test_unload_lets_an_in_flight_stream_finish_and_refuses_new_requests(
    own_stack: Callable[..., Stack],
) -> None:
    stack = own_stack()
    body = {"model": MODEL, "messages": MESSAGES, "stream": True, "mock": {"ttft_ms": 50, "itl_ms": 20, "tokens": 40}}
    async with httpx.AsyncClient(base_url=stack.url, headers=AUTH, timeout=30) as client:
        async with client.stream("POST", CHAT, json=body) as response:
            lines = response.aiter_lines()
            async for line in lines:
                if '"content":"' in line and '"content":""' not in line:
                    break  # generating: now unload
            unload = asyncio.create_task(client.post("/v1/model/unload"))
            await wait_for_state(client, "unloading")
            refused = await client.post(CHAT, json={"messages": MESSAGES})
            assert refused.status_code == 503 and refused.headers["Retry-After"]
            rest = [line async for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert sum('"content":"' in line for line in rest) == 39  # every token after the first
        unloaded = await unload
        assert unloaded.status_code == 200 and unloaded.json()["state"] == "idle"


async def wait_for_state(client: httpx.AsyncClient, state: str, timeout_s: float = 5) -> None:
    deadline = time.monotonic() + timeout_s
    while (await client.get("/v1/model")).json()["state"] != state:
        assert time.monotonic() < deadline, f"never reached {state}"
        await asyncio.sleep(0.01)


class _OneRequestPerConnection(FakeEngine):
    """An engine that answers one chat request per connection and resets the connection on the next one, while its
    answers say keep-alive: what llama-server's HTTP threads beyond its fixed pool do."""

    extra_headers = b"Keep-Alive: timeout=5, max=100\r\n"
    chats = 0

    def setup(self) -> None:
        super().setup()
        self.answered_chat = False

    def chat(self) -> bool:
        if self.answered_chat:
            # SO_LINGER 0: the close is a reset, as the engine's write side sees it when it drops the socket.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return False
        type(self).chats += 1
        self.answered_chat = True
        chunk = {
            "id": "c",
            "object": "chat.completion.chunk",
            "model": "fake",
            "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
        self.send(b"text/event-stream", b"data: " + json.dumps(chunk).encode() + b"\n\ndata: [DONE]\n\n")
        return True


def test_a_pooled_connection_the_engine_resets_is_retried_on_a_new_one(
    start_sidecar: Callable[..., SidecarProcess],
) -> None:
    with serving(_OneRequestPerConnection) as url:
        sidecar = in_front_of(url, start_sidecar)
        body = {"model": "fake", "messages": MESSAGES, "stream": True}
        for _ in range(3):
            response = httpx.post(f"{sidecar.url}{CHAT}", json=body, headers=AUTH, timeout=30)
            assert response.status_code == 200, response.text
            assert response.text.endswith("data: [DONE]\n\n")
        assert _OneRequestPerConnection.chats == 3


class _OversizedAnswers(FakeEngine):
    """An engine whose answer is larger than the sidecar holds, by the request's last message: one event that
    never ends ("endless event"), a stream of small events longer than the bound ("long stream"), a JSON body
    past it ("large body"), or headers that never end ("large headers"). It notes whether the sidecar cut it off
    before it had written everything."""

    cut_off: list[str] = []
    PIECE = b"x" * 65536

    def handle(self) -> None:
        try:
            super().handle()
        except ConnectionResetError:  # the sidecar dropped the connection: what the test wants of it
            pass

    def chat(self) -> bool:
        kind = json.loads(self.body)["messages"][-1]["content"]
        if kind == "large body":
            self.send(b"application/json", b'{"choices": [], "padding": "' + b"x" * 3_000_000 + b'"}')
            return True
        if kind == "large headers":
            try:
                self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Padding: ")
                for _ in range(1000):
                    self.wfile.write(self.PIECE)
            except OSError:
                type(self).cut_off.append(kind)
            return False
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        delta = {"choices": [{"index": 0, "delta": {"content": "y" * 1000}, "finish_reason": None}]}
        event = b"data: " + json.dumps(delta).encode() + b"\n\n"
        reads = [b"data: ", *[self.PIECE] * 1000] if kind == "endless event" else [event * 64] * 1000
        try:
            for read in reads:  # 64 MB in all, far past the bound
                self.wfile.write(b"%x\r\n%s\r\n" % (len(read), read))
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            type(self).cut_off.append(kind)
            return False
        return True


def test_an_answer_larger_than_the_sidecar_holds_is_a_502_and_the_engines_request_is_dropped(
    start_sidecar: Callable[..., SidecarProcess], openai_client: Callable[..., openai.OpenAI]
) -> None:
    """An engine's answer is untrusted input: an event that never ends, a stream to assemble or a JSON body past
    `SIDECAR_MAX_ANSWER_BYTES`, or headers past `SIDECAR_MAX_HEADER_BYTES`, is not held; the client gets a 502 (a
    stream's error event once its status is out), the engine's connection is closed, and the sidecar goes on."""
    with serving(_OversizedAnswers) as url:
        sidecar = in_front_of(url, start_sidecar, {"SIDECAR_MAX_ANSWER_BYTES": str(1024 * 1024)})
        client = openai_client(sidecar, KEY)

        def ask(kind: str, stream: bool) -> Any:
            messages: Any = [{"role": "user", "content": kind}]
            return client.chat.completions.create(model="fake", messages=messages, stream=stream)

        with pytest.raises(openai.APIError) as streamed:
            for _ in ask("endless event", stream=True):
                pass
        assert streamed.value.code == "engine_answer_too_large"
        answer_bound = "larger than SIDECAR_MAX_ANSWER_BYTES (1048576 bytes)"
        head_bound = "headers are larger than 65536 bytes (SIDECAR_MAX_HEADER_BYTES)"
        for kind, bound in [
            ("endless event", answer_bound),
            ("long stream", answer_bound),
            ("large body", answer_bound),
            ("large headers", head_bound),
        ]:
            with pytest.raises(openai.APIStatusError) as refused:
                ask(kind, stream=False)
            assert refused.value.status_code == 502, kind
            assert refused.value.code == "engine_answer_too_large"
            assert bound in refused.value.message
        cut_off = ["endless event", "endless event", "large headers", "long stream"]
        wait_until(lambda: sorted(_OversizedAnswers.cut_off) == cut_off, timeout_s=10)
        assert httpx.get(f"{sidecar.url}/ready", timeout=5).status_code == 200
        warnings = [line for line in sidecar.output().splitlines() if "[sidecar.proxy]" in line]
        assert sum("engine_answer_too_large" in line for line in warnings) == 5, warnings


class _ClaimingEngine(FakeEngine):
    """An engine whose answers carry the sidecar's own headers, as if it had measured them."""

    extra_headers = b'X-Performance-Metrics: {"ttft_ms": 0.001}\r\nX-Sidecar-Worker: 7\r\nX-Engine-Own: kept\r\n'

    def chat(self) -> bool:
        chunk = {"id": "c", "object": "chat.completion.chunk", "model": "fake", "choices": []}
        if json.loads(self.body).get("stream"):
            chunk["choices"] = [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]
            self.send(b"text/event-stream", b"data: " + json.dumps(chunk).encode() + b"\n\ndata: [DONE]\n\n")
        else:
            answer = {"id": "c", "object": "chat.completion", "model": "fake", "choices": []}
            self.send(b"application/json", json.dumps(answer).encode())
        return True


def test_an_engines_answer_cannot_carry_the_sidecars_own_headers(start_sidecar: Callable[..., SidecarProcess]) -> None:
    """X-Performance-Metrics and X-Sidecar-Worker are the sidecar's: an engine's are dropped, its other headers kept."""
    with serving(_ClaimingEngine) as url:
        sidecar = in_front_of(url, start_sidecar, {"SIDECAR_ASSEMBLE_NON_STREAMING": "false"})
        for stream in (False, True):
            body = {"model": "fake", "messages": MESSAGES, "stream": stream}
            response = httpx.post(f"{sidecar.url}{CHAT}", json=body, headers=AUTH, timeout=30)
            assert response.status_code == 200, response.text
            assert response.headers["x-engine-own"] == "kept"
            assert "x-sidecar-worker" not in response.headers
            measured = response.headers.get_list("x-performance-metrics")
            if stream:
                assert measured == []  # a stream's measures go in its usage chunk
            else:
                assert len(measured) == 1
                assert json.loads(measured[0]) == response.json()["usage"]["performance"]


class _MiscountingEngine(FakeEngine):
    """An engine whose usage is not counts: a prompt count that is text, a negative completion count."""

    def chat(self) -> bool:
        delta = {"id": "c", "object": "chat.completion.chunk", "model": "fake"}
        events = [
            delta | {"choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]}
            for word in ("one", "two", "three")
        ]
        usage = {"prompt_tokens": "eight", "completion_tokens": -3, "total_tokens": None}
        events.append(delta | {"choices": [], "usage": usage})
        stream = b"".join(b"data: " + json.dumps(event).encode() + b"\n\n" for event in events)
        self.send(b"text/event-stream", stream + b"data: [DONE]\n\n")
        return True


def test_usage_that_is_not_counts_is_not_taken_for_them(start_sidecar: Callable[..., SidecarProcess]) -> None:
    """The engine's usage is untrusted: what is not a count of tokens (text, a negative number) is not reported as
    one; the sidecar counts the streamed tokens instead, and the request's record and metrics are kept as for any
    other."""
    with serving(_MiscountingEngine) as url:
        sidecar = in_front_of(url, start_sidecar)
        body = {"model": "fake", "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}}
        headers = AUTH | {"X-Request-ID": "miscounted-1"}
        response = httpx.post(f"{sidecar.url}{CHAT}", json=body, headers=headers, timeout=30)
        assert response.status_code == 200, response.text
        usage = json.loads(response.text.split("data: ")[-2])["usage"]
        performance = usage["performance"]
        assert performance["prompt_tokens"] is None
        assert performance["completion_tokens"] == 3 and performance["tokens_estimated"] is True

        def recorded() -> bool:
            found = httpx.get(f"{sidecar.url}/v1/requests/miscounted-1", headers=AUTH, timeout=5)
            return found.status_code == 200

        wait_until(recorded, timeout_s=5)
        metrics = httpx.get(f"{sidecar.url}/metrics", timeout=5).text
        assert 'sidecar_tokens_total{engine="external",kind="completion",model="fake"} 3.0' in metrics
        assert "bookkeeping_failed" not in sidecar.output()


class _OddHeads(FakeEngine):
    """An engine that sends an informational head before its answer ("continue"), or a status HTTP does not have."""

    def chat(self) -> bool:
        if json.loads(self.body)["messages"][-1]["content"] == "continue":
            chunk = {"id": "c", "object": "chat.completion.chunk", "model": "fake"}
            chunk["choices"] = [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.send(b"text/event-stream", b"data: " + json.dumps(chunk).encode() + b"\n\ndata: [DONE]\n\n")
            return True
        self.wfile.write(b"HTTP/1.1 999 Odd\r\nContent-Length: 0\r\n\r\n")
        return False  # the sidecar drops the connection: nothing more comes on it


def test_an_informational_head_is_skipped_and_a_status_http_lacks_is_a_502(
    start_sidecar: Callable[..., SidecarProcess], openai_client: Callable[..., openai.OpenAI]
) -> None:
    with serving(_OddHeads) as url:
        sidecar = in_front_of(url, start_sidecar)
        client = openai_client(sidecar, KEY)
        stream = client.chat.completions.create(
            model="fake", messages=[{"role": "user", "content": "continue"}], stream=True
        )
        assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == "hi"
        with pytest.raises(openai.APIStatusError) as refused:
            client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "odd"}])
        assert refused.value.status_code == 502
        assert refused.value.message.endswith("the engine's answer is not HTTP/1.1: status 999")
        assert "unhandled_error" not in sidecar.output()


class _OpenAfterDone(FakeEngine):
    """An engine that sends its answer and [DONE], then holds its body open (no last chunk) for a minute."""

    ended: list[str] = []

    def chat(self) -> bool:
        chunk = {"id": "c", "object": "chat.completion.chunk", "model": "fake"}
        chunk["choices"] = [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]
        events = b"data: " + json.dumps(chunk).encode() + b"\n\ndata: [DONE]\n\n"
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        self.wfile.write(b"%x\r\n%s\r\n" % (len(events), events))
        self.connection.settimeout(60)
        ended = self.rfile.read(1)  # what the sidecar does with the connection: b"" once it drops it
        type(self).ended.append("dropped" if ended == b"" else "written to")
        return False


def test_a_body_held_open_after_done_does_not_hold_the_request(start_sidecar: Callable[..., SidecarProcess]) -> None:
    """After [DONE] the answer is whole: the client has it at once, and the request is over within a second (its
    record kept, its slot free), the engine's connection dropped, rather than held for the inter-token timeout."""
    with serving(_OpenAfterDone) as url:
        sidecar = in_front_of(url, start_sidecar)
        body = {"model": "fake", "messages": MESSAGES, "stream": True}
        headers = AUTH | {"X-Request-ID": "open-after-done"}
        response = httpx.post(f"{sidecar.url}{CHAT}", json=body, headers=headers, timeout=30)
        assert response.status_code == 200 and response.text.endswith("data: [DONE]\n\n")

        def recorded() -> bool:
            found = httpx.get(f"{sidecar.url}/v1/requests/open-after-done", headers=AUTH, timeout=5)
            return found.status_code == 200

        wait_until(recorded, timeout_s=5)
        wait_until(lambda: _OpenAfterDone.ended == ["dropped"], timeout_s=5)


class _UnendingMetrics(FakeEngine):
    """An engine whose /metrics never ends: 256 MB at full speed on the first scrape ("flood"), then nothing more;
    a line every 0.1 s on the next ("trickle"). It notes how each ended: the sidecar hanging up on it, or (the
    flood) all of it written."""

    scrapes = 0
    ended: list[str] = []
    PIECE = b"# " + b"x" * 65533 + b"\n"

    def get(self, path: str) -> bool:
        if path != "/metrics":
            return super().get(path)
        type(self).scrapes += 1
        kind = "flood" if type(self).scrapes == 1 else "trickle"
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n")
        piece = self.PIECE if kind == "flood" else b"#\n"
        try:
            for _ in range(4096) if kind == "flood" else iter(int, 1):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                if kind == "trickle":
                    time.sleep(0.1)
        except OSError:
            type(self).ended.append(f"{kind} hung up on")
            return False
        self.rfile.read(1)  # b"" once the sidecar closes the connection
        type(self).ended.append(f"{kind} written whole")
        return False


def test_an_engines_metrics_that_never_end_cost_the_scrape_its_load_not_the_sidecar(
    start_sidecar: Callable[..., SidecarProcess],
) -> None:
    """A scrape of the sidecar reads the engine's /metrics: an endless one is cut off at its size bound, one that
    trickles at its 3 s deadline (httpx's own read timeout is per read), and the scrape answers without the
    engine's load figures."""
    with serving(_UnendingMetrics) as url:
        sidecar = in_front_of(url, start_sidecar)
        for _ in ("flood", "trickle"):
            scrape = httpx.get(f"{sidecar.url}/metrics", timeout=15)
            assert scrape.status_code == 200
            assert "sidecar_engine_queued_requests{" not in scrape.text
            wait_until(lambda: len(_UnendingMetrics.ended) == _UnendingMetrics.scrapes, timeout_s=10)
        assert _UnendingMetrics.ended == ["flood hung up on", "trickle hung up on"]
        assert httpx.get(f"{sidecar.url}/ready", timeout=5).status_code == 200


class _LavishTimings(FakeEngine):
    """An engine whose own timings (llama.cpp's `timings`) are 20 KB: past what the sidecar keeps of them."""

    def chat(self) -> bool:
        chunk = {"id": "c", "object": "chat.completion.chunk", "model": "fake"}
        events = [
            chunk | {"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]},
            chunk | {"choices": [], "timings": {"predicted_ms": 1.5, "notes": "x" * 20_000}},
        ]
        stream = b"".join(b"data: " + json.dumps(event).encode() + b"\n\n" for event in events)
        self.send(b"text/event-stream", stream + b"data: [DONE]\n\n")
        return True


def test_engine_timings_past_their_bound_are_left_out(
    start_sidecar: Callable[..., SidecarProcess], openai_client: Callable[..., openai.OpenAI]
) -> None:
    """The engine's own timings go into `usage.performance`, the X-Performance-Metrics header, the request's
    record (a thousand kept) and its access line: those past 2 KiB of JSON are left out of all of them, so that
    the answer's head stays within what a proxy in front takes (nginx's 4 KiB by default)."""
    with serving(_LavishTimings) as url:
        sidecar = in_front_of(url, start_sidecar)
        answer = openai_client(sidecar, KEY).chat.completions.with_raw_response.create(
            model="fake", messages=MESSAGES, extra_headers={"X-Request-ID": "lavish-1"}
        )
        performance = answer.parse().usage.model_extra["performance"]  # type: ignore[union-attr]
        assert answer.parse().choices[0].message.content == "hi"
        assert "engine_timings" not in performance and performance["completion_tokens"] == 1
        assert json.loads(answer.headers["x-performance-metrics"]) == performance
        assert sum(len(name) + len(value) + 4 for name, value in answer.headers.items()) < 4096
        record = httpx.get(f"{sidecar.url}/v1/requests/lavish-1", headers=AUTH, timeout=5).json()
        assert "engine_timings" not in record["performance"]


class _BrokenUtf8(FakeEngine):
    """An engine that streams a token's bytes cut short (half a multi-byte character, not UTF-8), as llama.cpp's
    server once did for a character split across tokens."""

    def chat(self) -> bool:
        head = b'data: {"id":"c","object":"chat.completion.chunk","model":"fake","choices":[{"index":0,"delta":'
        tail = b',"finish_reason":null}]}\n\n'
        deltas = [b'{"content":"one "}', b'{"content":"\xe2\x82"}', b'{"content":" three"}']
        stream = b"".join(head + delta + tail for delta in deltas)
        self.send(b"text/event-stream", stream + b"data: [DONE]\n\n")
        return True


def test_a_token_not_utf8_is_kept_in_an_assembled_answer(start_sidecar: Callable[..., SidecarProcess]) -> None:
    """A non-streaming client's answer, put together from the engine's stream, keeps every token: one whose bytes
    are not UTF-8 is read with U+FFFD in their place (as the SSE standard decodes a stream), not dropped."""
    with serving(_BrokenUtf8) as url:
        sidecar = in_front_of(url, start_sidecar)
        body = {"model": "fake", "messages": MESSAGES}
        response = httpx.post(f"{sidecar.url}{CHAT}", json=body, headers=AUTH, timeout=30)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["choices"][0]["message"]["content"] == "one \ufffd three"
        assert answer["usage"]["performance"]["completion_tokens"] == 3


_FLOATS = struct.pack("<4f", 0.5, -0.25, 0.125, 1.0)


class _RawEmbeddings(FakeEngine):
    """vLLM's embeddings with `encoding_format: "bytes"`: the vectors as raw floats, their JSON in a header."""

    extra_headers = b'metadata: {"usage": {"prompt_tokens": 2, "total_tokens": 2}}\r\n'

    def chat(self) -> bool:
        self.send(b"application/octet-stream", _FLOATS)
        return True


def test_an_answer_that_is_not_json_goes_as_it_is_and_is_measured_in_its_header(
    start_sidecar: Callable[..., SidecarProcess],
) -> None:
    with serving(_RawEmbeddings) as url:
        sidecar = in_front_of(url, start_sidecar)
        body = {"model": "fake", "input": "two words", "encoding_format": "bytes"}
        headers = AUTH | {"X-Request-ID": "raw-floats-1"}
        response = httpx.post(f"{sidecar.url}/v1/embeddings", json=body, headers=headers, timeout=30)
        assert response.status_code == 200, response.text
        assert response.content == _FLOATS and response.headers["metadata"].startswith('{"usage"')
        performance = json.loads(response.headers["x-performance-metrics"])
        assert performance["latency_ms"] > 0 and performance["ttft_ms"] is None
        assert performance["prompt_tokens"] == 2  # the usage in vLLM's metadata header
        record = httpx.get(f"{sidecar.url}/v1/requests/raw-floats-1", headers=AUTH, timeout=5).json()
        assert record["performance"] == performance


class _WrittenEmbeddings(FakeEngine):
    """Embeddings as an engine may write them, by the request's input: pretty-printed with numbers as it writes
    them, the usage last (vLLM's place) or first (llama-server's, after its scalars); or the usage between."""

    ANSWERS: ClassVar[dict[str, bytes]] = {
        "usage last": b'{\n  "data": [{"embedding": [0.50, 1E-5, -0.0]}],\n  "usage": {"prompt_tokens": 2}\n}\n',
        "usage first": b'{"object": "list", "usage": {"prompt_tokens": 2}, "data": [{"embedding": [0.50, 1E-5]}]}',
        "usage between": b'{"data": [{"embedding": [0.50, 1E-5]}], "usage": {"prompt_tokens": 2}, "model": "m"}',
    }

    def chat(self) -> bool:
        self.send(b"application/json", self.ANSWERS[json.loads(self.body)["input"]])
        return True


def test_an_embeddings_answer_goes_as_the_engine_wrote_it_with_performance_in_its_usage(
    start_sidecar: Callable[..., SidecarProcess],
) -> None:
    """Where the usage is at the answer's end or head, the answer's bytes are the engine's own, not parsed and
    written again; elsewhere the answer is parsed to add it. Either way the usage is the engine's."""
    with serving(_WrittenEmbeddings) as url:
        sidecar = in_front_of(url, start_sidecar)
        answers = {}
        for kind, written in _WrittenEmbeddings.ANSWERS.items():
            body = {"model": "fake", "input": kind}
            response = httpx.post(f"{sidecar.url}/v1/embeddings", json=body, headers=AUTH, timeout=30)
            assert response.status_code == 200, response.text
            answer = response.json()
            performance = answer["usage"].pop("performance")
            assert answer == json.loads(written) and answer["usage"] == {"prompt_tokens": 2}
            assert performance == json.loads(response.headers["x-performance-metrics"])
            assert performance["prompt_tokens"] == 2 and performance["total_ms"] > 0
            answers[kind] = response.content
        for kind in ("usage last", "usage first"):
            written = _WrittenEmbeddings.ANSWERS[kind]
            value_at = written.index(b'"usage": ') + len(b'"usage": ')
            after = written[written.index(b"}", value_at) + 1 :]
            assert answers[kind].startswith(written[:value_at]) and answers[kind].endswith(after), kind
        assert b"[0.5,0.00001]" in answers["usage between"]  # parsed and written again
