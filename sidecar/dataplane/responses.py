"""The Responses API's stream (`POST /v1/responses` with `"stream": true`), relayed and measured.

Its events pass through as the engine wrote them, each as soon as it is read. An event is output when it is a
delta (`response.output_text.delta`, a reasoning, refusal or tool-call arguments delta): that is what TTFT, ITL
and latency are timed on. The event that ends the response (`response.completed`, `.incomplete` or `.failed`)
carries the whole response and its usage, in input and output tokens: it is the only one re-serialized, with
`usage.performance` added, as the usage chunk of a chat stream is. There is no `[DONE]`: the stream ends with the
engine's body. A non-streamed response is a whole JSON answer (`Relays.whole`).
"""

from __future__ import annotations

import time
from typing import Any

from sidecar.dataplane.chunks import carries_measures, is_response_output, response_usage
from sidecar.dataplane.exchange import Exchange, dumps, header_timings, loads, response_headers, sse_error
from sidecar.dataplane.recording import Recorder
from sidecar.dataplane.relay import answer_too_large
from sidecar.dataplane.sse import EventTooLarge, SSEParser
from sidecar.dataplane.upstream import Response
from sidecar.dataplane.upstream_errors import UpstreamError
from sidecar.errors import BadGateway, GatewayTimeout, SidecarError
from sidecar.settings import Settings


class ResponsesRelay:
    def __init__(self, settings: Settings, recorder: Recorder) -> None:
        self.settings = settings
        self.recorder = recorder

    async def stream(self, exchange: Exchange, response: Response) -> None:
        send = exchange.send
        exchange.status = response.status
        exchange.timings = header_timings(response)
        await send({"type": "http.response.start", "status": response.status, "headers": response_headers(response)})
        error = await self._pump(exchange, response)
        if error is not None and not exchange.client_done:
            # The status went out with the first event: an error event (which the OpenAI SDK raises), then the end.
            exchange.error = error.code
            await send({"type": "http.response.body", "body": sse_error(error)})
        elif not exchange.client_done:
            await send({"type": "http.response.body", "body": b""})

    async def _pump(self, exchange: Exchange, response: Response) -> SidecarError | None:
        """Read the engine's events to the end of its body, timestamping the output ones, and forward what each read
        brings at once; None when the body ended, else the error that cut it short."""
        meter = exchange.meter
        send = exchange.send
        clock = time.perf_counter_ns
        limit = self.settings.max_answer_bytes
        parser = SSEParser(limit)
        read = response.readany
        deadline = exchange.deadline
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
                                    raw = self._final_event(exchange, raw, parsed, usage, now)
                        out.append(raw)
                    if out and not exchange.client_done:
                        await send({"type": "http.response.body", "body": b"".join(out), "more_body": True})
                    meter.overhead_ns += clock() - now
                    if not chunk:
                        return None
        except TimeoutError:
            return GatewayTimeout("the engine sent no token within the timeout")
        except UpstreamError:
            return BadGateway("the engine closed the stream mid-answer")
        except EventTooLarge:
            return answer_too_large(exchange, limit, "event")

    def _final_event(
        self, exchange: Exchange, raw: bytes, event: dict[str, Any], usage: dict[str, Any], now: int
    ) -> bytes:
        """The event that ends the response, its usage given `performance`: the answer is measured as it ends."""
        exchange.usage = usage
        exchange.final_events = (event["response"],)
        performance = self.recorder.finish(exchange, now)
        event["response"]["usage"] = usage | {"performance": performance}
        named = b"event: " + str(event["type"]).encode() + b"\n" if raw.startswith(b"event:") else b""
        return named + b"data: " + dumps(event) + b"\n\n"
