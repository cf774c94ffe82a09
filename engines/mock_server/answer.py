"""What the mock engine answers with: its configuration, a request's pace and faults, the answer's shape, and
the pieces of its events, shaped as vLLM's."""

from __future__ import annotations

import itertools
import json
import sys
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from engines.mock_server import generation as gen
from engines.mock_server.gpu import GpuMemory


@dataclass
class MockConfig:
    model: str = "mock-model"
    ttft_s: float = 0.02
    itl_s: float = 0.005
    tokens: int = 16
    api_key: str | None = None  # as vLLM's --api-key: /v1 routes need `Authorization: Bearer <key>`
    max_num_seqs: int | None = None  # as vLLM's: at most this many requests generate, the rest wait (None: all run)
    sleep_mode: bool = False  # vLLM's /sleep, /wake_up and /is_sleeping
    runtime_lora: bool = False  # vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter
    weights: GpuMemory | None = None  # the GPU memory held at start (--gpu-mb): what sleep frees and wake takes back
    weights_mb: float = 0.0


@dataclass
class Stats:
    started: int = 0
    completed: int = 0
    cancelled: int = 0
    in_flight: int = 0
    waiting: int = 0  # of those in flight, waiting for one of the max_num_seqs slots
    ids: itertools.count[int] = field(default_factory=itertools.count)
    # The engine's own clock for its recent answers, by their id: when each output step was written, in ms from
    # the request's arrival. Tests compare the sidecar's measurements with these rather than with a fixed window.
    outputs_ms: dict[str, list[float]] = field(default_factory=dict)
    last_headers: dict[str, str] = field(default_factory=dict)  # of the last generation request: what reached it

    def timed(self, answer_id: str) -> list[float]:
        if len(self.outputs_ms) >= 256:
            del self.outputs_ms[next(iter(self.outputs_ms))]
        times: list[float] = []
        self.outputs_ms[answer_id] = times
        return times


@dataclass(frozen=True)
class Pace:
    """How the answer is delivered: the engine's delays, or a request's `mock` overrides, and faults to inject."""

    ttft_s: float
    itl_s: float
    die_after: int | None = None  # the process exits after this many output steps (an engine crash)
    stall_after: int | None = None  # it sends nothing more after this many steps (a hung engine)
    drop_after: int | None = None  # it drops the connection after this many steps, and lives on
    error_after: int | None = None  # it fails the answer after this many steps, as vLLM does (an error event)
    timings: bool = False  # report llama.cpp-style `timings` and TGI-style `x-compute-time`
    gpu_mb: float = 0.0  # GPU memory held from the first token to the last (needs PyTorch and a GPU)

    @classmethod
    def of(cls, config: MockConfig, overrides: dict[str, Any]) -> Pace:
        return cls(
            ttft_s=float(overrides.get("ttft_ms", config.ttft_s * 1000)) / 1000,
            itl_s=float(overrides.get("itl_ms", config.itl_s * 1000)) / 1000,
            die_after=overrides.get("die_after"),
            stall_after=overrides.get("stall_after"),
            drop_after=overrides.get("drop_after"),
            error_after=overrides.get("error_after"),
            timings=bool(overrides.get("timings")),
            gpu_mb=float(overrides.get("gpu_mb", 0.0)),
        )


@dataclass(frozen=True)
class Answer:
    """What the mock will answer one request with, streamed or not."""

    base: dict[str, Any]  # id, object, created, model
    chat: bool
    choices: list[list[gen.Token]]
    tool: tuple[str, list[str]] | None  # the function called and its arguments in pieces
    finish: str
    want_logprobs: bool
    usage: dict[str, Any]
    pace: Pace
    received_ns: int  # the engine's clock when the request arrived
    prompt_logprobs: list[dict[str, Any] | None] | None = None  # asked for: only a whole answer has them (vLLM)
    kv_transfer: bool = False  # asked with kv_transfer_params: a whole answer has its own (vLLM's)

    @property
    def steps(self) -> int:
        """Output events per choice: one per token, or one per piece of the tool call's arguments."""
        return len(self.tool[1]) if self.tool else len(self.choices[0])


def output_line(line: str, repeat: int = 1) -> None:
    """A line of the engine's output, as engines write theirs: plain, on stdout, at once; `repeat` times in one
    write, as an engine in a loop printing an error floods its output."""
    sys.stdout.write((line + "\n") * repeat)
    sys.stdout.flush()


def vllm_error(message: str, status: int, error_type: str = "BadRequestError") -> dict[str, Any]:
    """An error body as vLLM shapes it: flat, the HTTP status as its int `code`."""
    return {"object": "error", "message": message, "type": error_type, "param": None, "code": status}


# What the `error_after` fault fails an answer with: an error event in a stream, the body of a 500 without one.
MID_ANSWER_ERROR = vllm_error("the mock failed mid-answer", 500, "InternalServerError")


def error_response(message: str, status: int = 400, shape: str = "vllm") -> Response:
    """An error as engines shape them: vLLM's (flat, int code), TGI's, or plain text."""
    if shape == "tgi":
        return JSONResponse({"error": message, "error_type": "validation"}, status_code=status)
    if shape == "text":
        return Response(message, status_code=status, media_type="text/plain")
    return JSONResponse(vllm_error(message, status), status_code=status)


async def json_object(request: Request) -> dict[str, Any] | Response:
    """The request's body as a JSON object, or the 400 vLLM answers when it is not one."""
    try:
        body = await request.json()
    except ValueError:
        return error_response("invalid JSON")
    if not isinstance(body, dict):
        return error_response("body must be an object")
    return body


TIMINGS = {"prompt_n": 4, "prompt_ms": 1.25, "predicted_n": 16, "predicted_ms": 80.5}


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def tool_call(index: int, tool: tuple[str, list[str]], full: bool, step: int = 0) -> dict[str, Any]:
    name, pieces = tool
    call: dict[str, Any] = {"index": 0, "id": f"call_mock_{index}", "type": "function"}
    if full:
        return {k: v for k, v in call.items() if k != "index"} | {
            "function": {"name": name, "arguments": "".join(pieces)}
        }
    if step == 0:
        return call | {"function": {"name": name, "arguments": pieces[0]}}
    return {"index": 0, "function": {"arguments": pieces[step]}}


def stream_choice(
    chat: bool, index: int, tokens: list[gen.Token], step: int, tool: tuple[str, list[str]] | None, want_logprobs: bool
) -> dict[str, Any]:
    if chat and tool:
        delta: dict[str, Any] = {"tool_calls": [tool_call(index, tool, full=False, step=step)]}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
    token = tokens[step]
    if chat:
        logprobs = gen.chat_logprobs([token]) if want_logprobs else None
        return {"index": index, "delta": {"content": token.text}, "logprobs": logprobs, "finish_reason": None}
    offset = sum(len(t.text) for t in tokens[:step])
    logprobs = gen.completion_logprobs([token], offset) if want_logprobs else None
    return {"index": index, "text": token.text, "logprobs": logprobs, "finish_reason": None}
