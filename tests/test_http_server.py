"""What a client may hold of the sidecar (sidecar/server/http_server.py), against a real sidecar with the mock engine:
a head past the size limit gets 431, a head or a body that stops coming gets 408, the connection closed after
either; a client that stops reading its answer is cut off and its engine request cancelled; what is not HTTP
gets an OpenAI 400; an answer longer than the client timeout, read as it comes, is never cut by it."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.processes import SidecarProcess, running, wait_until

KEY = "http-bounds-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
TIMEOUT_S = 1.0  # the sidecar's client timeout here
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProcess]:
    env = {
        "SIDECAR_API_KEYS": KEY,
        "SIDECAR_AUTOLOAD_ENGINE": "mock",
        "SIDECAR_AUTOLOAD_MODEL": "mock-model",
        "SIDECAR_AUTOLOAD_ARGS": json.dumps({"ttft-ms": 1, "itl-ms": 1, "tokens": 4}),
        "SIDECAR_CLIENT_TIMEOUT_S": str(TIMEOUT_S),
        # Shorter than the client's: waiting on a client that does not read must not read as the engine's silence.
        "SIDECAR_UPSTREAM_INTER_TOKEN_TIMEOUT_S": "0.5",
    }
    with running(tmp_path_factory.mktemp("http-bounds"), env, ready=True) as process:
        yield process


def _connect(sidecar: SidecarProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", sidecar.port), timeout=15)


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def _raw(sidecar: SidecarProcess, request: bytes) -> bytes:
    with _connect(sidecar) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        return _read_all(sock)


def _status(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.1 ") else 0


def _error(raw: bytes) -> dict[str, Any]:
    """The OpenAI error of an answer the server wrote itself, which closes the connection after it."""
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"connection: close" in head.lower(), head
    error: dict[str, Any] = json.loads(body)["error"]
    assert isinstance(error["message"], str) and error["type"] == "invalid_request_error", error
    return error


def _chat_head(content_length: int, extra: str = "") -> bytes:
    """A chat request's head as a client writes it, for a body of that length sent by the test itself."""
    return (
        f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {content_length}\r\n{extra}\r\n"
    ).encode()


def _access_line(sidecar: SidecarProcess, request_id: str) -> str | None:
    lines = sidecar.output().splitlines()
    return next((line for line in lines if f"request_id={request_id}" in line and "[sidecar.access]" in line), None)


def _still_standing(sidecar: SidecarProcess) -> None:
    assert sidecar.process.poll() is None, sidecar.output()[-2000:]
    chat = {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(f"{sidecar.url}{CHAT}", json=chat, headers=AUTH, timeout=30).status_code == 200


def _chat_4xx(sidecar: SidecarProcess) -> float:
    families = text_string_to_metric_families(httpx.get(f"{sidecar.url}/metrics", headers=AUTH).text)
    return sum(
        sample.value
        for family in families
        if family.name == "sidecar_requests"
        for sample in family.samples
        if sample.name == "sidecar_requests_total"
        and sample.labels.get("status") == "4xx"
        and sample.labels.get("route") == CHAT
    )


# -- the head's size -------------------------------------------------------------------------------------------


def test_a_head_past_the_limit_is_refused_with_431(sidecar: SidecarProcess) -> None:
    # 100 headers of 1 KB, read at once: the head is measured once complete.
    headers = "".join(f"X-Filler-{i}: {'a' * 1000}\r\n" for i in range(100))
    answer = _raw(sidecar, f"GET /health HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
    assert _status(answer) == 431, answer[:300]
    assert _error(answer)["code"] == "headers_too_large"
    big = AUTH | {"X-Big": "a" * 100_000}
    response = httpx.get(f"{sidecar.url}/v1/models", headers=big, timeout=30)
    assert response.status_code == 431 and response.json()["error"]["code"] == "headers_too_large"
    # Within the limit (64 KiB by default) a head passes.
    assert httpx.get(f"{sidecar.url}/health", headers={"X-Big": "a" * 60_000}, timeout=30).status_code == 200
    assert "request_head_too_large" in sidecar.output()
    _still_standing(sidecar)


def test_a_head_that_never_ends_is_cut_off_without_being_kept(sidecar: SidecarProcess) -> None:
    """One header streamed without end: before the bound it was all kept (200 MB took 300 MB and a minute of
    the event loop); now the connection is closed once the head passes the limit."""
    process = psutil.Process(sidecar.pid)
    rss_before = process.memory_info().rss
    sent = 0
    with _connect(sidecar) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
        try:
            while sent < 64 * 2**20:
                sock.sendall(b"a" * 65536)
                sent += 65536
        except (ConnectionResetError, BrokenPipeError):
            pass
    assert sent < 32 * 2**20, "the sidecar kept reading a head 64 MB long"
    assert process.memory_info().rss - rss_before < 16 * 2**20
    _still_standing(sidecar)


def test_what_is_not_http_gets_an_openai_400(sidecar: SidecarProcess) -> None:
    answer = _raw(sidecar, b"NOT HTTP AT ALL\r\n\r\n")
    assert _status(answer) == 400, answer[:300]
    assert _error(answer)["code"] == "invalid_http"
    _still_standing(sidecar)


@pytest.mark.parametrize(
    "upgrade",
    [
        "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
        "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n",
    ],
    ids=["websocket", "h2c"],
)
def test_an_upgrade_request_is_served_as_the_http_request_it_also_is(sidecar: SidecarProcess, upgrade: str) -> None:
    """No route is a WebSocket, and the server speaks HTTP/1.1 only (`curl --http2` asks for h2c): an upgrade
    request gets what its HTTP request earns (the key checked, an OpenAI error, a request id), never a WebSocket
    handshake, and the connection closes after its answer (the parser ends such a request at its head)."""
    upgrade = "Host: x\r\n" + upgrade
    refused = _raw(sidecar, f"GET /v1/models HTTP/1.1\r\n{upgrade}\r\n".encode())
    head, _, body = refused.partition(b"\r\n\r\n")
    assert _status(refused) == 401, refused[:300]
    assert b"x-request-id: " in head and b"connection: close" in head
    assert "missing API key" in json.loads(body)["error"]["message"]
    with _connect(sidecar) as sock:  # not shut for writing: the server is the one to close it, after its answer
        sock.sendall(f"GET /v1/models HTTP/1.1\r\nAuthorization: Bearer {KEY}\r\n{upgrade}\r\n".encode())
        served = _read_all(sock)
    assert _status(served) == 200 and b'"mock-model"' in served, served[:300]
    assert b"connection: close" in served.partition(b"\r\n\r\n")[0]
    output = sidecar.output()
    assert "WebSocket" not in output and "Unsupported upgrade" not in output
    _still_standing(sidecar)


def test_the_bounds_are_settings(tmp_path: Path) -> None:
    process = SidecarProcess(tmp_path, {"SIDECAR_MAX_HEADER_BYTES": "4096", "SIDECAR_CLIENT_TIMEOUT_S": "0.5"})
    try:
        process.wait_healthy()
        assert httpx.get(f"{process.url}/health", headers={"X-Big": "a" * 3000}).status_code == 200
        assert httpx.get(f"{process.url}/health", headers={"X-Big": "a" * 5000}).status_code == 431
        with socket.create_connection(("127.0.0.1", process.port), timeout=15) as sock:
            started = time.monotonic()
            assert _read_all(sock) == b""
            assert 0.4 < time.monotonic() - started < 10
    finally:
        process.stop()


# -- the client's time -----------------------------------------------------------------------------------------


def test_a_connection_that_sends_nothing_is_closed_after_the_timeout(sidecar: SidecarProcess) -> None:
    with _connect(sidecar) as sock:
        started = time.monotonic()
        assert _read_all(sock) == b"", "a connection that sent nothing is closed without an answer"
        waited = time.monotonic() - started
    assert TIMEOUT_S * 0.9 < waited < TIMEOUT_S + 10, waited


def test_a_head_that_stops_coming_gets_408(sidecar: SidecarProcess) -> None:
    with _connect(sidecar) as sock:
        sock.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n".encode())
        started = time.monotonic()
        answer = _read_all(sock)
        waited = time.monotonic() - started
    assert _status(answer) == 408, answer[:300]
    assert _error(answer)["code"] == "request_timeout"
    assert TIMEOUT_S * 0.9 < waited < TIMEOUT_S + 10, waited
    _still_standing(sidecar)


def test_a_head_trickled_a_byte_at_a_time_is_not_kept_open_by_it(sidecar: SidecarProcess) -> None:
    """Slowloris: a byte well within the timeout each time does not extend the head's time."""
    head = f"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: {'a' * 1000}".encode()
    with _connect(sidecar) as sock:
        started = time.monotonic()
        try:
            for byte in head:
                sock.sendall(bytes([byte]))
                time.sleep(TIMEOUT_S / 5)  # the pace of the attack: the test's clock, not a wait for the server
                if time.monotonic() - started > TIMEOUT_S + 10:
                    break
        except (ConnectionResetError, BrokenPipeError):
            pass
        answer = _read_all(sock)
        waited = time.monotonic() - started
    assert _status(answer) == 408, answer[:300]
    assert waited < TIMEOUT_S + 10, waited


def test_a_storm_of_slow_heads_is_one_log_line_not_one_each(start_sidecar: Callable[..., SidecarProcess]) -> None:
    sidecar = start_sidecar({"SIDECAR_CLIENT_TIMEOUT_S": str(TIMEOUT_S)})
    connections = [_connect(sidecar) for _ in range(40)]
    try:
        for sock in connections:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        answers = [_status(_read_all(sock)) for sock in connections]
    finally:
        for sock in connections:
            sock.close()
    assert answers == [408] * 40
    assert httpx.get(f"{sidecar.url}/health").status_code == 200
    lines = [line for line in sidecar.output().splitlines() if "client_timeout" in line]
    # The first at once; the rest of the burst, within the throttle's 5 s, counted into the next line.
    assert len(lines) == 1 and "waiting_for=head" in lines[0] and "timed_out=1" in lines[0], lines


def test_a_body_that_stops_coming_gets_408_and_is_logged_so(sidecar: SidecarProcess) -> None:
    request_id = "stalled-body-1"
    counted_before = _chat_4xx(sidecar)
    with _connect(sidecar) as sock:
        sock.sendall(_chat_head(1000, f"X-Request-ID: {request_id}\r\n") + b'{"model": "mock-model", ')
        started = time.monotonic()
        answer = _read_all(sock)
        waited = time.monotonic() - started
    assert _status(answer) == 408, answer[:300]
    assert _error(answer)["code"] == "request_timeout"
    assert TIMEOUT_S * 0.9 < waited < TIMEOUT_S + 10, waited

    wait_until(lambda: _access_line(sidecar, request_id) is not None, timeout_s=10)
    line = _access_line(sidecar, request_id)
    assert line is not None and "status=408" in line and "client_timed_out=True" in line, line
    assert "waiting_for=body" in sidecar.output()
    assert _chat_4xx(sidecar) == counted_before + 1
    _still_standing(sidecar)


def test_a_body_sent_slowly_but_steadily_is_read_whole(sidecar: SidecarProcess) -> None:
    """The body's timeout is between reads: a body that takes longer than it in all, in steady parts, passes."""
    body = json.dumps({"model": "mock-model", "messages": [{"role": "user", "content": "x" * 200}]}).encode()
    parts = [body[i : i + len(body) // 5 + 1] for i in range(0, len(body), len(body) // 5 + 1)]
    with _connect(sidecar) as sock:
        sock.sendall(_chat_head(len(body), "Connection: close\r\n"))
        started = time.monotonic()
        for part in parts:
            time.sleep(TIMEOUT_S / 2)  # the client's pace, under the timeout each time
            sock.sendall(part)
        assert time.monotonic() - started > TIMEOUT_S * 1.5
        answer = _read_all(sock)
    assert _status(answer) == 200, answer[:300]


def test_a_client_that_expects_100_continue_gets_it_or_its_refusal_before_sending_the_body(
    sidecar: SidecarProcess,
) -> None:
    """curl asks `Expect: 100-continue` for bodies past 1 MB and waits a second for the answer before sending: the
    body is asked for at once, and a body that will be refused (too large, no key) is refused before it is sent."""
    body = json.dumps({"model": "mock-model", "messages": [{"role": "user", "content": "x" * 200}]}).encode()
    with _connect(sidecar) as sock:
        sock.sendall(_chat_head(len(body), "Expect: 100-continue\r\nConnection: close\r\n"))
        assert sock.recv(65536).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(body)
        assert _status(_read_all(sock)) == 200
    for head in (
        _chat_head(64 * 1024 * 1024, "Expect: 100-continue\r\n"),  # past the body limit
        _chat_head(len(body), "Expect: 100-continue\r\n").replace(KEY.encode(), b"wrong-key"),
    ):
        with _connect(sidecar) as sock:
            sock.sendall(head)
            answer = sock.recv(65536)  # without a byte of the body
            assert _status(answer) in (413, 403), answer[:200]


def test_an_answer_longer_than_the_client_timeout_is_not_cut(sidecar: SidecarProcess) -> None:
    chat = {
        "model": "mock-model",
        "stream": True,
        "messages": [{"role": "user", "content": "take your time"}],
        "mock": {"tokens": 12, "itl_ms": 250},  # 3 s of tokens, three times the client timeout
    }
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", f"{sidecar.url}{CHAT}", json=chat, headers=AUTH) as response:
            assert response.status_code == 200
            lines = [line for line in response.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        assert sum('"content"' in line for line in lines) >= 12
        assert client.get(f"{sidecar.url}/health").status_code == 200  # the same connection serves the next


def test_a_client_that_stops_reading_is_cut_off_and_its_engine_request_cancelled(sidecar: SidecarProcess) -> None:
    model = httpx.get(f"{sidecar.url}/v1/model", headers=AUTH).json()
    engine_stats = f"http://127.0.0.1:{model['port']}/mock/stats"
    cancelled_before = httpx.get(engine_stats).json()["cancelled"]
    request_id = "stops-reading-1"
    chat = {
        "model": "mock-model",
        "stream": True,
        "messages": [{"role": "user", "content": "a long answer"}],
        "mock": {"tokens": 200_000, "itl_ms": 0},  # far more than the socket buffers between them hold
    }
    body = json.dumps(chat).encode()

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(15)
        sock.connect(("127.0.0.1", sidecar.port))
        sock.sendall(_chat_head(len(body), f"X-Request-ID: {request_id}\r\n") + body)
        # Not a byte read: the sidecar's buffer fills, and after the client timeout it gives up on this client.
        wait_until(lambda: _access_line(sidecar, request_id) is not None, timeout_s=30)
        answer = _read_all(sock)  # what its own receive buffer held at the cut, then the connection's reset
    assert _status(answer) == 200 and not answer.rstrip().endswith(b"data: [DONE]")
    # Reset, not closed: what the sidecar's kernel still held for it (megabytes) is dropped, not sent on.
    assert len(answer) < 64 * 1024, len(answer)
    line = _access_line(sidecar, request_id)
    assert line is not None and "client_timed_out=True" in line and "client_disconnected=True" in line, line
    assert "client_timeout" in sidecar.output() and "waiting_for=reads" in sidecar.output()
    # Cut off as a client gone: the engine's request is cancelled, and no engine timeout is blamed on it.
    wait_until(lambda: httpx.get(engine_stats).json()["cancelled"] > cancelled_before, timeout_s=10)
    record = httpx.get(f"{sidecar.url}/v1/requests/{request_id}", headers=AUTH).json()
    assert record["client_disconnected"] is True and record["error"] is None
    assert "error=" not in line
    _still_standing(sidecar)
