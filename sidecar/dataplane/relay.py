"""How an answer goes back to the client: an engine's error in the OpenAI shape, a whole JSON answer with its
`usage.performance`, a passed-through body, a stream relayed as it is read, or a stream assembled into the answer
a non-streaming client asked for.

Streams pass through as they are read, forwarded as the engine wrote them; only the usage chunk is ever
re-serialized. Each event is checked for output on its raw bytes (`chunks.has_output`), which is what timestamps
it; JSON is parsed only for chunks that carry usage or timings, or when `n` > 1. Until the first output, a read
goes to the client from the engine connection's own callback, before its bookkeeping and with no task woken
(`first_output` in `_pump`); every read after it goes through the relay's loop, which writes what piled up while
it waited its turn in one write.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from sidecar import request_state
from sidecar.dataplane.answers import (
    answer_too_large,
    end_stream,
    error_body,
    send_assembled,
    send_engine_error,
    send_error_event,
    start_stream,
    stream_cut,
)
from sidecar.dataplane.chunks import (
    Assembler,
    carries_measures,
    choice_has_output,
    engine_timings,
    has_output,
    is_usage_chunk,
)
from sidecar.dataplane.exchange import (
    ERROR_BODY_LIMIT,
    Exchange,
    dumps,
    header_timings,
    loads,
    metadata_usage,
    response_headers,
    send_now,
    send_whole,
)
from sidecar.dataplane.recording import Recorder, performance_header
from sidecar.dataplane.sse import DONE, EventTooLarge, SSEParser
from sidecar.dataplane.upstream import Response
from sidecar.dataplane.upstream_errors import UpstreamError
from sidecar.errors import BadGateway, GatewayTimeout, SidecarError
from sidecar.logs import get_logger
from sidecar.settings import Settings
from sidecar.telemetry.otel_attributes import finish_reasons

log = get_logger("sidecar.proxy")  # the proxy's lines, whichever of its modules writes them

# After [DONE] only the end of the engine's body is to come, in the same read or the next: waited for this long,
# after which the connection is dropped rather than the request held (its slot, the drain of an unload) for the
# inter-token timeout by an engine that keeps its body open.
_END_AFTER_DONE_S = 1.0


class Relays:
    """The relay modes, each given the exchange and the engine's response once its status says it is no error
    (`error` where it does)."""

    def __init__(self, settings: Settings, recorder: Recorder) -> None:
        self.settings = settings
        self.recorder = recorder

    async def error(self, exchange: Exchange, response: Response) -> None:
        """The engine's 4xx/5xx: its status kept, its body in the OpenAI shape."""
        raw = await error_body(response, self.settings.upstream_inter_token_timeout_s, ERROR_BODY_LIMIT)
        await send_engine_error(exchange, response, response.status, raw)

    async def whole(self, exchange: Exchange, response: Response, splice_usage: bool = False) -> None:
        """A non-streamed JSON answer: `usage.performance` added, and the same in X-Performance-Metrics. Another
        answer (vLLM's embeddings as raw bytes) goes as it is, measured all the same: its figures in the header.
        `splice_usage`: where its usage is at its end or head, `performance` is written into its bytes unparsed."""
        limit = self.settings.max_answer_bytes
        try:
            async with asyncio.timeout(self.settings.upstream_inter_token_timeout_s):
                parts = await response.read_parts(limit + 1)
        except TimeoutError:
            raise GatewayTimeout("the engine stopped answering within the timeout") from None
        except UpstreamError:
            raise BadGateway("the engine closed the connection mid-answer") from None
        if sum(map(len, parts)) > limit:
            raise answer_too_large(exchange, limit, "answer")
        now = time.perf_counter_ns()
        exchange.meter.whole_body(now)
        exchange.status = response.status
        headers = response_headers(response)
        exchange.timings = header_timings(response)
        spliced = self.recorder.with_performance_spliced(exchange, parts, now) if splice_usage else None
        if spliced is not None:
            parts, performance = spliced
        elif (answer := loads(raw := b"".join(parts))) is not None:
            if exchange.span is not None:
                exchange.final_events = (answer,)
            usage = answer.get("usage")
            exchange.usage = usage if isinstance(usage, dict) else None
            exchange.timings = engine_timings(answer) or exchange.timings
            raw, performance = self.recorder.with_performance(exchange, answer, now)
            parts = [raw]
        else:
            exchange.usage = metadata_usage(response)
            performance = performance_header(exchange.performance or self.recorder.finish(exchange, now))
        headers.append((b"x-performance-metrics", performance))
        exchange.meter.overhead_ns += time.perf_counter_ns() - now
        await send_whole(exchange, response.status, headers, parts)

    async def raw(self, exchange: Exchange, response: Response) -> None:
        """Another path's answer (`Proxy.passthrough`), its bytes as the engine sent them, unmeasured."""
        send = exchange.send
        headers = response_headers(response)
        if response.content_length is not None:  # the bytes go through unchanged: the engine's length holds
            headers.append((b"content-length", str(response.content_length).encode()))
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.settings.upstream_inter_token_timeout_s) as deadline:
                while chunk := await response.readany():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    deadline.reschedule(loop.time() + self.settings.upstream_inter_token_timeout_s)
        except (UpstreamError, TimeoutError) as exc:
            # The status is sent: leaving the body unfinished makes the server drop the connection, so the
            # client sees a cut answer rather than a short one that looks whole.
            log.warning("engine_answer_cut", path=exchange.scope["path"], error=exc.__class__.__name__)
            return
        await send({"type": "http.response.body", "body": b""})

    async def stream(self, exchange: Exchange, response: Response) -> None:
        """SSE through as it is read; the usage chunk removed, or given `usage.performance`."""
        await start_stream(exchange, response)
        error = await self._pump(exchange, response, None)
        if exchange.prompt_count is not None and exchange.performance is None and error is None:
            await self.recorder.finish_counted(
                exchange, time.perf_counter_ns()
            )  # for the record, after the client's answer
        await end_stream(exchange, error)

    async def assembled(self, exchange: Exchange, response: Response, assembler: Assembler) -> None:
        """A non-streaming request streamed from the engine (for its TTFT), answered as the engine would."""
        exchange.timings = header_timings(response)
        error = await self._pump(exchange, response, assembler)
        if error is not None:
            try:
                raise error
            finally:
                del error  # its traceback holds this frame: a name left for it here would be a reference cycle
        if assembler.error is not None:  # failed mid-answer: an error, as the engine answers one without streaming
            await send_error_event(exchange, response, assembler.error)
            return
        now = time.perf_counter_ns()
        exchange.status = response.status
        if assembler.usage is None:  # the engine streams no usage: the sidecar's count
            await self.recorder.finish_counted(exchange, now)
            exchange.usage = self.recorder.counted_usage(exchange)
        await send_assembled(self.recorder, exchange, response, assembler.result(), now)

    async def _pump(self, exchange: Exchange, response: Response, assembler: Assembler | None) -> SidecarError | None:
        """Read the engine's SSE stream to its end, timestamping every event; forward the events to the client
        as each read brings them (nothing waits for a later read), or give them to the assembler.

        None when the stream ended, else the error that cut it short (the exchange's deadline: the first-token
        timeout until the first output, then the inter-token timeout from each read).
        """
        meter = exchange.meter
        send = exchange.send
        parse_every = assembler is not None or exchange.choices_left is not None  # several choices: each timed
        clock = time.perf_counter_ns
        limit = self.settings.max_answer_bytes
        parser = SSEParser(limit)
        assembled = 0  # bytes of the events given to the assembler, which holds them all
        last_data = b""  # the last chunk, for a usage chunk the engine did not send
        read = response.readany
        previous_data = b""  # and the one before it: the last with choices, where the last is the usage chunk
        done = False
        deadline = exchange.deadline
        if assembler is None and not parse_every and meter.first_output_ns is None:
            client = request_state.of(exchange.scope)

            def first_output(chunk: bytes) -> bool:
                """A read before the first output, written to the client from the engine connection's callback,
                before any of its bookkeeping and with no task woken: where its events are whole, carry no usage or
                timings and do not end the stream, and the client is there with room in its buffer. Else (False) the
                loop takes it (a client gone: the cancelled task)."""
                nonlocal previous_data, last_data
                now = clock()
                events = parser.whole_events(chunk)
                writes = client.client_writes
                if events is None or exchange.client_done or client.client_gone or (writes is not None and writes[0]):
                    return False
                datas = []
                for event in events:
                    data = event.data
                    if data is None or data == DONE or carries_measures(data):
                        return False
                    datas.append(data)
                try:
                    sent = send_now(send, {"type": "http.response.body", "body": chunk, "more_body": True})
                except Exception:  # raised again where the loop sends the same read: the task's to handle
                    return False
                if not sent:
                    return False
                deadline.read_ns = now
                for data in datas:
                    previous_data, last_data = last_data, data
                    if has_output(data):
                        meter.output(now)
                if meter.first_output_ns is not None:
                    response.hand_reads_to(None)  # the first token is out: the loop takes every read after it
                meter.overhead_ns += clock() - now
                return True

            response.hand_reads_to(first_output)
        try:
            with deadline:
                while True:
                    chunk = await read()
                    deadline.read_ns = now = clock()
                    out: list[bytes] = []
                    for event in parser.feed(chunk) if chunk else parser.close():
                        data = event.data
                        raw: bytes | None = event.raw
                        if data == DONE:
                            done = True
                            exchange.final_events = (previous_data, last_data)
                            if exchange.client_usage and exchange.performance is None and assembler is None:
                                out.append(await self._counted_usage_event(exchange, out, last_data, now))
                        elif data is not None:
                            previous_data, last_data = last_data, data
                            if parse_every or carries_measures(data):
                                parsed = loads(data)
                                if parsed is not None:
                                    self._measure_parsed(exchange, parsed, now)
                                    if assembler is not None:
                                        assembled += len(data)
                                        if assembled > limit:
                                            return answer_too_large(exchange, limit, "assembled answer")
                                        assembler.add(parsed)
                                    elif is_usage_chunk(parsed):
                                        raw = self._usage_event(exchange, parsed, raw)
                            elif has_output(data):
                                meter.output(now)
                        if raw is not None and assembler is None:
                            out.append(raw)
                    if out and not exchange.client_done:
                        # One write for what one read brought: an engine's events that arrived together. After
                        # [DONE] the answer is complete: the end of the body goes in the same write.
                        exchange.client_done = done
                        await send({"type": "http.response.body", "body": b"".join(out), "more_body": not done})
                    meter.overhead_ns += clock() - now
                    if not chunk:
                        return None
                    if done:
                        await _body_end(response)
                        return None
        except (TimeoutError, UpstreamError, EventTooLarge) as exc:
            return stream_cut(exchange, exc, limit)
        finally:
            response.hand_reads_to(None)  # the handler holds this frame, which holds the response: no cycle left

    def _usage_event(self, exchange: Exchange, chunk: dict[str, Any], raw: bytes | None) -> bytes | None:
        """The usage chunk for the client: with `usage.performance`, or none when only the sidecar asked. A usage
        chunk read while other choices go on (llama-server sends one a choice) goes as the engine wrote it."""
        if not exchange.client_usage:
            return None
        if exchange.performance is None:
            return raw
        usage = chunk["usage"] | {"performance": exchange.performance}
        return b"data: " + dumps(chunk | {"usage": usage}) + b"\n\n"

    async def _counted_usage_event(self, exchange: Exchange, out: list[bytes], last_data: bytes, now: int) -> bytes:
        """The usage chunk the client asked for and the engine did not send: llama-server puts a completion's usage
        in its last choice's chunk, which goes as it came, and this chunk repeats it; llama-cpp-python ignores
        `stream_options`, and this chunk has the streamed tokens and the prompt counted. The events read before
        it (`out`) go to the client first when the prompt's count is awaited: events are never held back."""
        if exchange.prompt_count is not None and out:
            await exchange.send({"type": "http.response.body", "body": b"".join(out), "more_body": True})
            out.clear()
        last = loads(last_data) or {}
        chunk = {key: last[key] for key in ("id", "object", "created", "model", "system_fingerprint") if key in last}
        engines_usage = exchange.usage
        performance = await self.recorder.finish_counted(exchange, now)
        usage = (engines_usage or self.recorder.counted_usage(exchange)) | {"performance": performance}
        return b"data: " + dumps(chunk | {"choices": [], "usage": usage}) + b"\n\n"

    def _measure_parsed(self, exchange: Exchange, chunk: dict[str, Any], now: int) -> None:
        meter = exchange.meter
        left = exchange.choices_left
        ended = False
        for choice in chunk.get("choices") or ():
            index = choice.get("index", 0) if left is not None else 0
            if choice_has_output(choice):
                meter.output(now, index)
            if choice.get("finish_reason") is not None:
                ended = True
                if left is not None:
                    left.discard(index)
        if ended and exchange.span is not None:  # for the trace: why each choice ended
            exchange.finish_reasons = (exchange.finish_reasons or []) + finish_reasons(chunk)
        timings = engine_timings(chunk)
        if timings is not None:
            exchange.timings = timings
        usage = chunk.get("usage")
        if isinstance(usage, dict) and exchange.note_usage(usage, is_usage_chunk(chunk), ended):
            if exchange.performance is None:
                self.recorder.finish(exchange, now)  # the usage chunk ends the answer: [DONE] follows


async def _body_end(response: Response) -> None:
    """What comes after [DONE] (the body's end, else nothing meant for anyone), for `_END_AFTER_DONE_S` at most: a
    body not ended by then is left unfinished, which drops the connection once the response is closed."""
    if response.complete:  # the usual case: the end came in the same read
        return
    with contextlib.suppress(TimeoutError, UpstreamError):
        async with asyncio.timeout(_END_AFTER_DONE_S):
            while await response.readany():
                pass
