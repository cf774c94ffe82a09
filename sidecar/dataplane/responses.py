"""The Responses API (`POST /v1/responses`), relayed and measured.

A stream's events pass through as the engine wrote them, each as soon as it is read. An event is output when it is
a delta (`response.output_text.delta`, a reasoning, refusal or tool-call arguments delta): that is what TTFT, ITL
and latency are timed on. The event that ends the response (`response.completed`, `.incomplete` or `.failed`)
carries the whole response and its usage, in input and output tokens: it is the only one re-serialized, with
`usage.performance` added, as the usage chunk of a chat stream is. There is no `[DONE]`: the stream ends with the
engine's body.

A non-streaming request is streamed from the engine too, for its TTFT, and answered with the response object that
last event carries: what the engine answers whole, built by it, not put together here.
"""

from __future__ import annotations

import time
from typing import Any

from sidecar.dataplane.chunks import carries_measures, is_response_output, response_usage
from sidecar.dataplane.exchange import Exchange, dumps, header_timings, loads, response_headers
from sidecar.dataplane.recording import Recorder
from sidecar.dataplane.relay import end_stream, send_assembled, stream_cut
from sidecar.dataplane.sse import EventTooLarge, SSEParser
from sidecar.dataplane.upstream import Response
from sidecar.dataplane.upstream_errors import UpstreamError
from sidecar.errors import BadGateway, SidecarError
from sidecar.settings import Settings


class ResponsesRelay:
    """The two relay modes of a Responses API answer that streams: to a streaming client, or to a whole one."""

    def __init__(self, settings: Settings, recorder: Recorder) -> None:
        self.settings = settings
        self.recorder = recorder

    async def stream(self, exchange: Exchange, response: Response) -> None:
        """The events through as they are read; the one that ends the response given `usage.performance`."""
        send = exchange.send
        exchange.status = response.status
        exchange.timings = header_timings(response)
        await send({"type": "http.response.start", "status": response.status, "headers": response_headers(response)})
        ended = await self._pump(exchange, response, forward=True)
        await end_stream(exchange, ended if isinstance(ended, SidecarError) else None)

    async def assembled(self, exchange: Exchange, response: Response) -> None:
        """A non-streaming request streamed from the engine: answered with the response its last event carries."""
        exchange.timings = header_timings(response)
        ended = await self._pump(exchange, response, forward=False)
        if isinstance(ended, SidecarError):
            try:
                raise ended
            finally:
                del ended  # its traceback holds this frame: a name left for it here would be a reference cycle
        if ended is None:
            raise BadGateway("the engine's stream ended before its response did")
        now = time.perf_counter_ns()
        exchange.status = response.status
        await send_assembled(self.recorder, exchange, response, ended, now)

    async def _pump(
        self, exchange: Exchange, response: Response, forward: bool
    ) -> SidecarError | dict[str, Any] | None:
        """Read the engine's events to the end of its body, timestamping the output ones; with `forward`, send what
        each read brings at once. The response the last event carried (None if none did), or the error that cut
        the stream short."""
        meter = exchange.meter
        send = exchange.send
        clock = time.perf_counter_ns
        limit = self.settings.max_answer_bytes
        parser = SSEParser(limit)
        read = response.readany
        deadline = exchange.deadline
        ended: dict[str, Any] | None = None
        try:
            with deadline:
                while True:
                    chunk = await read()
                    deadline.read_ns = now = clock()
                    out: list[bytes] = []
                    for event in parser.feed(chunk) if chunk else parser.close():
                        data = event.data
                        raw = event.raw
                        if data is not None:
                            if is_response_output(data):
                                meter.output(now)
                            elif carries_measures(data):
                                parsed = loads(data)
                                usage = response_usage(parsed) if parsed is not None else None
                                if parsed is not None and usage is not None:
                                    ended = parsed["response"]
                                    self._ended(exchange, ended, usage, now)
                                    if forward:
                                        raw = _with_performance(raw, parsed, usage, exchange.performance)
                        out.append(raw)
                    if forward and out and not exchange.client_done:
                        await send({"type": "http.response.body", "body": b"".join(out), "more_body": True})
                    meter.overhead_ns += clock() - now
                    if not chunk:
                        return ended
        except (TimeoutError, UpstreamError, EventTooLarge) as exc:
            return stream_cut(exchange, exc, limit)

    def _ended(self, exchange: Exchange, ended: dict[str, Any], usage: dict[str, Any], now: int) -> None:
        """The event that ends the response has come: the answer is measured as it ends."""
        exchange.usage = usage
        exchange.final_events = (ended,)
        self.recorder.finish(exchange, now)


def _with_performance(raw: bytes, event: dict[str, Any], usage: dict[str, Any], performance: Any) -> bytes:
    """The event that ends the response for the client: its usage with `performance`, its event name kept."""
    event["response"]["usage"] = usage | {"performance": performance}
    named = b"event: " + str(event["type"]).encode() + b"\n" if raw.startswith(b"event:") else b""
    return named + b"data: " + dumps(event) + b"\n\n"
