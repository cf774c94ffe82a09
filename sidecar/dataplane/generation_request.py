"""A generation request as the proxy reads and changes it on its way to the engine: the fields it acts on, checked;
usage asked for in the client's own bytes; and, for an engine that streams no usage, its prompt counted by the
engine's tokenizer beside it."""

from __future__ import annotations

import json
from typing import Any

from sidecar.control.engine import Engine
from sidecar.dataplane.exchange import ERROR_BODY_LIMIT, JSON_TYPE, dumps, encoded, loads
from sidecar.dataplane.upstream import UpstreamPool
from sidecar.dataplane.upstream_errors import UpstreamError
from sidecar.errors import BadRequest
from sidecar.logs import get_logger

log = get_logger("sidecar.proxy")

_ASK_FOR_USAGE = b',"stream_options":{"include_usage":true}'


def generation_fields(body: dict[str, Any]) -> tuple[bool, dict[str, Any] | None, int]:
    """The fields the proxy acts on, checked: a wrong type is the client's 400, not the engine's problem."""
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise BadRequest("'stream' must be a boolean", param="stream")
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise BadRequest("'stream_options' must be an object", param="stream_options")
        # As OpenAI: a string or number here is refused, not read as "not asked" (the usage chunk taken from the
        # client) nor as "asked" (what the engine's lax parsing of "true" or 1 would make of it).
        include_usage = options.get("include_usage")
        if include_usage is not None and not isinstance(include_usage, bool):
            raise BadRequest("'stream_options.include_usage' must be a boolean", param="stream_options.include_usage")
    n = body.get("n")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool)):
        raise BadRequest("'n' must be an integer", param="n")
    return bool(stream), options, n or 1


def whole_only(body: dict[str, Any]) -> bool:
    """Whether a non-streaming request asks for what the engine answers only without streaming, so that it goes as
    it is rather than streamed for assembly (its TTFT then unmeasured):

    - vLLM's `prompt_logprobs`, 0 included (each prompt token's own logprob; a 400 when streamed, above 0), and
      `echo` (a whole answer also has the prompt's logprobs, which `echo` asks for by default in a chat, and a
      stream carries the prompt's token ids where a whole answer does not);
    - `use_beam_search` (a 400 for a streamed completion; a beam's answer comes whole at its end anyway);
    - `kv_transfer_params`/`ec_transfer_params` (disaggregated serving: the answer's own, which its router reads
      from a prefill's answer, are in a whole answer only);
    - `stream_options` (OpenAI and vLLM refuse them without `stream`: the engine says so in its own words);
    - the Responses API's `background`, answered at once with the response queued, for the client to poll.
    """
    return (
        body.get("prompt_logprobs") is not None
        or body.get("echo") is True
        or body.get("use_beam_search") is True
        or body.get("kv_transfer_params") is not None
        or body.get("ec_transfer_params") is not None
        or bool(body.get("stream_options"))
        or body.get("background") is True
    )


def asking_for_usage(raw: bytes, body: dict[str, Any]) -> bytes | None:
    """The client's bytes with `stream_options.include_usage` added before the object's closing brace, where that
    says exactly what serializing the changed body would: a streamed request without `stream_options`, in UTF-8.
    None for any other. Re-serializing costs as much as the prompt is long: about 175 µs for a 50 KB chat, the
    splice 4.5 µs."""
    if body.get("stream") is not True or "stream_options" in body:
        return None
    # An object opening with its brace and no NUL after it is UTF-8 (a BOM, UTF-16 and UTF-32 put another byte first
    # or a NUL second): the usual body, told without json.detect_encoding's six calls.
    if not (raw[:1] == b"{" and raw[1:2] != b"\x00") and json.detect_encoding(raw) != "utf-8":
        return None
    end = raw.rfind(b"}")  # the object's own: only whitespace may follow it in valid JSON
    return raw[:end] + _ASK_FOR_USAGE + raw[end:]


async def count_prompt(upstream: UpstreamPool, engine: Engine, body: dict[str, Any]) -> int | None:
    """The prompt's tokens, counted by the engine's own tokenizer; None where it cannot say."""
    question = engine.adapter.prompt_count_request(body)
    if question is None:
        return None
    path, count_body = question
    try:
        headers = [JSON_TYPE, *encoded(engine.upstream_headers)]
        response = await upstream.request("POST", engine.base_url, path, headers, dumps(count_body))
        try:
            raw = await response.read(ERROR_BODY_LIMIT)
        finally:
            response.close()
    except UpstreamError as exc:
        log.warning("prompt_count_failed", path=path, error=str(exc))
        return None
    if response.status != 200:
        log.warning("prompt_count_failed", path=path, status=response.status)
        return None
    return engine.adapter.prompt_count(loads(raw))
