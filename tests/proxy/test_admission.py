"""Admission control, end to end: a real sidecar with SIDECAR_MAX_CONCURRENT_REQUESTS in front of the mock.

Requests beyond the limit wait in the sidecar's queue, in arrival order, and report that wait as `queue_ms`
outside their TTFT; a full queue or a wait past the limit is a 429 in the OpenAI shape with Retry-After,
counted in /metrics; a queued client that leaves gives its place up and never reaches the engine.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

from tests.processes import wait_until
from tests.proxy.conftest import AUTH, MESSAGES, MODEL, Stack, assert_timed_as_the_engine, sample_value, samples

CHAT = "/v1/chat/completions"


def _limited(own_stack: Callable[..., Stack], queued: int = 8, timeout_s: float = 30) -> Stack:
    env = {
        "SIDECAR_MAX_CONCURRENT_REQUESTS": "1",
        "SIDECAR_MAX_QUEUED_REQUESTS": str(queued),
        "SIDECAR_QUEUE_TIMEOUT_S": str(timeout_s),
    }
    return own_stack(env=env, engine_args={"ttft-ms": 20, "itl-ms": 20, "tokens": 10})


def _stream(stack: Stack, mock: dict[str, Any] | None = None, started: threading.Event | None = None) -> Any:
    """One streamed chat through the openai SDK; its usage.performance, with the answer's id as `_answer_id`."""
    extra = {"mock": mock} if mock else None
    chunks = stack.client().chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}, extra_body=extra
    )
    usage, answer_id = None, None
    for chunk in chunks:
        if started is not None:
            started.set()
        usage, answer_id = chunk.usage or usage, chunk.id
    assert usage is not None
    return usage.model_extra["performance"] | {"_answer_id": answer_id}


def _gauge(stack: Stack, name: str) -> float:
    return sample_value(samples(stack), name)


def test_requests_beyond_the_limit_queue_and_report_the_wait_outside_ttft(own_stack: Callable[..., Stack]) -> None:
    stack = _limited(own_stack)
    with ThreadPoolExecutor(3) as pool:
        # Each answer takes about 20 + 9 x 20 = 200 ms at the engine; one at a time.
        answers = [pool.submit(_stream, stack) for _ in range(3)]
        wait_until(lambda: _gauge(stack, "sidecar_requests_queued") == 2, timeout_s=5, interval_s=0.01)
        assert _gauge(stack, "sidecar_requests_active") == 1
        performances = sorted((future.result() for future in answers), key=lambda p: p["queue_ms"])
    queue_ms = [p["queue_ms"] for p in performances]
    assert queue_ms[0] < 50 and queue_ms[1] >= 150 and queue_ms[2] >= queue_ms[1] + 150, queue_ms
    for performance in performances:  # the engine's TTFT, the same whatever the wait before it
        assert_timed_as_the_engine(stack, performance["_answer_id"], performance, delay_ms=20)
    assert stack.engine_stats()["started"] == 1 + 3  # the warm-up, then the three
    assert _gauge(stack, "sidecar_requests_queued") == 0 and _gauge(stack, "sidecar_requests_active") == 0


def test_a_full_queue_is_a_429_with_retry_after_and_the_others_finish(own_stack: Callable[..., Stack]) -> None:
    stack = _limited(own_stack, queued=1)
    slow = {"ttft_ms": 20, "itl_ms": 150}  # 10 tokens: about 1.4 s
    first_started = threading.Event()
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(_stream, stack, slow, first_started)
        assert first_started.wait(10)
        second = pool.submit(_stream, stack)
        wait_until(lambda: _gauge(stack, "sidecar_requests_queued") == 1, timeout_s=5, interval_s=0.01)

        raw = httpx.post(
            stack.url + CHAT, json={"model": MODEL, "messages": MESSAGES}, headers=AUTH, timeout=5
        )  # answered at once: no wait for a place that cannot come
        assert raw.status_code == 429 and raw.headers["retry-after"] == "1"
        error = raw.json()["error"]
        assert (error["type"], error["code"]) == ("rate_limit_error", "queue_full")
        assert "(in flight: 1, queued: 1)" in error["message"]
        with pytest.raises(openai.RateLimitError):
            stack.client().chat.completions.create(model=MODEL, messages=MESSAGES)

        assert first.result()["queue_ms"] < 50
        assert second.result()["queue_ms"] >= 1000  # it waited for the slow one, then went through
    scraped = samples(stack)
    assert sample_value(scraped, "sidecar_requests_rejected_total", reason="queue_full") == 2
    assert sample_value(scraped, "sidecar_requests_total", route=CHAT, status="4xx", model="", engine="") >= 2
    assert stack.engine_stats()["started"] == 1 + 2  # the rejected ones never reached the engine


def test_a_wait_past_the_queue_timeout_is_a_429(own_stack: Callable[..., Stack]) -> None:
    stack = _limited(own_stack, timeout_s=0.5)
    first_started = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(_stream, stack, {"ttft_ms": 20, "itl_ms": 200}, first_started)
        assert first_started.wait(10)
        answered = httpx.post(stack.url + CHAT, json={"model": MODEL, "messages": MESSAGES}, headers=AUTH, timeout=5)
        assert answered.status_code == 429 and answered.headers["retry-after"] == "1"
        assert answered.json()["error"]["code"] == "queue_timeout"
        # Not before its timeout; well before the one ahead of it ends (20 + 9 x 200 ms at the engine).
        assert 0.5 <= answered.elapsed.total_seconds() < 1.5
        first.result()
    assert sample_value(samples(stack), "sidecar_requests_rejected_total", reason="queue_timeout") == 1


def test_a_queued_client_that_leaves_gives_its_place_up(own_stack: Callable[..., Stack]) -> None:
    stack = _limited(own_stack)
    first_started = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(_stream, stack, {"ttft_ms": 20, "itl_ms": 150}, first_started)
        assert first_started.wait(10)
        with pytest.raises(httpx.ReadTimeout):  # queued behind the slow one; the client gives up
            httpx.post(stack.url + CHAT, json={"model": MODEL, "messages": MESSAGES}, headers=AUTH, timeout=0.3)
        wait_until(lambda: _gauge(stack, "sidecar_requests_queued") == 0, timeout_s=5, interval_s=0.01)
        first.result()
    after = _stream(stack)
    assert after["queue_ms"] < 50  # nobody ahead of it: the one that left is not served first
    assert stack.engine_stats()["started"] == 1 + 2  # the warm-up, the slow one, this one: never the one that left
    access = [line for line in stack.sidecar.output().splitlines() if "[sidecar.access]" in line and CHAT in line]
    assert sum("status=499" in line and "client_disconnected=True" in line for line in access) == 1  # as nginx logs it


def test_without_a_limit_nothing_queues_and_queue_ms_is_near_zero(own_stack: Callable[..., Stack]) -> None:
    stack = own_stack(engine_args={"ttft-ms": 20, "itl-ms": 20, "tokens": 10})
    with ThreadPoolExecutor(4) as pool:
        performances = list(pool.map(lambda _: _stream(stack), range(4)))
    assert all(p["queue_ms"] < 50 for p in performances), performances
    assert _gauge(stack, "sidecar_requests_queued") == 0
