"""What every relay mode sends around or in place of an engine's answer: a stream's start and its end (with the
error that cut it), an engine's error in the OpenAI shape, and a non-streaming client's answer assembled from a
stream. The chat relay (`relay.py`) and the named-event relays (`responses.py`, `messages.py`) share them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from sidecar.dataplane.exchange import (
    JSON_TYPE,
    Exchange,
    dumps,
    header_timings,
    response_headers,
    send_json,
    send_whole,
    sse_error,
)
from sidecar.dataplane.recording import Recorder
from sidecar.dataplane.sse import EventTooLarge
from sidecar.dataplane.upstream import Response
from sidecar.dataplane.upstream_errors import UpstreamError
from sidecar.errors import BadGateway, GatewayTimeout, SidecarError, engine_error_body
from sidecar.logs import get_logger

log = get_logger("sidecar.proxy")  # the proxy's lines, whichever of its modules writes them


async def error_body(response: Response, timeout_s: float, limit: int) -> bytes:
    """The first `limit` bytes of an engine's error body, or none where it is not whole within `timeout_s` or its
    connection fails: the error's status is answered either way."""
    try:
        async with asyncio.timeout(timeout_s):
            return await response.read(limit)
    except (TimeoutError, UpstreamError):
        return b""


async def start_stream(exchange: Exchange, response: Response) -> None:
    """A stream's status and headers to the client, the engine's own."""
    exchange.status = response.status
    exchange.timings = header_timings(response)
    headers = response_headers(response)
    await exchange.send({"type": "http.response.start", "status": response.status, "headers": headers})


async def end_stream(
    exchange: Exchange, error: SidecarError | None, error_event: Callable[[SidecarError], bytes] = sse_error
) -> None:
    """The end of a relayed stream whose status went out with its first event: where the engine's stream was cut,
    an error event says what happened (the OpenAI SDK raises it; `error_event` writes it in another API's shape),
    then the body ends as streams do."""
    if exchange.client_done:
        return
    if error is not None:
        exchange.error = error.code
        await exchange.send({"type": "http.response.body", "body": error_event(error)})
    else:
        await exchange.send({"type": "http.response.body", "body": b""})


def stream_cut(exchange: Exchange, exc: Exception, limit: int) -> SidecarError:
    """The error for what cut the engine's stream short while it was read: the exchange's deadline, the engine's
    connection, or an event past `SIDECAR_MAX_ANSWER_BYTES` (`limit`)."""
    if isinstance(exc, TimeoutError):
        return GatewayTimeout("the engine sent no token within the timeout")
    if isinstance(exc, EventTooLarge):
        return answer_too_large(exchange, limit, "event")
    return BadGateway("the engine closed the stream mid-answer")


async def send_engine_error(exchange: Exchange, response: Response, status: int, raw: bytes) -> None:
    """An error of the engine's, `raw` as it wrote it, answered with `status` in the OpenAI shape."""
    await send_json(exchange, response, status, dumps(engine_error_body(status, raw)))


async def send_error_event(exchange: Exchange, response: Response, event: dict[str, Any]) -> None:
    """An error event in place of the answer, in the OpenAI shape, with the HTTP status its `code` names (vLLM,
    SGLang and llama.cpp put the status there), else 500."""
    error = event.get("error")
    code = (error if isinstance(error, dict) else event).get("code")
    status = code if isinstance(code, int) and not isinstance(code, bool) and 400 <= code <= 599 else 500
    await send_engine_error(exchange, response, status, dumps(event))


async def send_assembled(
    recorder: Recorder, exchange: Exchange, response: Response, body: dict[str, Any], now: int
) -> None:
    """A non-streaming client's answer, put together from the engine's stream: the body with `usage.performance`,
    the same in X-Performance-Metrics, as JSON."""
    raw, performance = recorder.with_performance(exchange, body, now)
    headers = [
        *response_headers(response, drop={"content-type"}),
        JSON_TYPE,
        (b"x-performance-metrics", performance),
    ]
    exchange.meter.overhead_ns += time.perf_counter_ns() - now
    await send_whole(exchange, response.status, headers, raw)


def answer_too_large(exchange: Exchange, limit: int, what: str) -> BadGateway:
    """The 502 for an engine's answer past `SIDECAR_MAX_ANSWER_BYTES`: what is held of it is let go, and closing
    the unfinished response drops the connection, which makes the engine abort the request."""
    log.warning("engine_answer_too_large", path=exchange.scope["path"], held=what, limit_bytes=limit)
    return BadGateway(
        f"the engine's {what} is larger than SIDECAR_MAX_ANSWER_BYTES ({limit} bytes)", code="engine_answer_too_large"
    )
