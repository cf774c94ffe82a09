from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.dataplane.chunks import (
    Assembler,
    carries_measures,
    carries_output,
    choices_usage,
    has_output,
    is_response_output,
    is_usage_chunk,
    response_usage,
)

CHUNKS: list[tuple[dict[str, Any], bool]] = [
    ({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}, False),
    ({"choices": [{"index": 0, "delta": {"content": "hi"}, "logprobs": None, "finish_reason": None}]}, True),
    ({"choices": [{"delta": {"content": None, "reasoning_content": "hmm"}}]}, True),
    ({"choices": [{"delta": {"reasoning": "hmm"}}]}, True),
    ({"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{"}}]}}]}, True),
    ({"choices": [{"delta": {"tool_calls": []}}]}, False),
    ({"choices": [{"delta": {"function_call": {"name": "f"}}}]}, True),
    ({"choices": [{"text": "x", "index": 0}]}, True),
    ({"choices": [{"text": "", "finish_reason": "stop"}]}, False),
    ({"choices": [], "usage": {"completion_tokens": 3}}, False),
    ({"choices": [{"delta": {}, "finish_reason": "stop"}]}, False),
    ({"choices": [{"delta": {"content": 'say \\"content\\": \\"x\\"'}}]}, True),
    ({"choices": [{"delta": {"content": ""}, "logprobs": {"content": [{"token": "a", "logprob": -1}]}}]}, False),
    ({"error": {"message": 'the "text": "x" was bad', "type": "server_error"}}, False),
    ({"choices": "garbage"}, False),
    ({}, False),
]


@pytest.mark.parametrize(("chunk", "expected"), CHUNKS)
def test_output_is_recognised_parsed_and_raw(chunk: dict[str, Any], expected: bool) -> None:
    assert carries_output(chunk) is expected
    assert has_output(json.dumps(chunk, separators=(",", ":")).encode()) is expected
    assert has_output(json.dumps(chunk).encode()) is expected  # Python's default ", " and ": "


_text = st.text(alphabet=st.sampled_from('ab "\\:{}[],\n'), max_size=8)
_delta = st.fixed_dictionaries(
    {},
    optional={
        "role": st.just("assistant"),
        "content": st.one_of(st.none(), _text),
        "reasoning_content": st.one_of(st.none(), _text),
        "tool_calls": st.lists(
            st.fixed_dictionaries({"index": st.just(0), "function": st.fixed_dictionaries({"arguments": _text})}),
            max_size=1,
        ),
    },
)
_choice = st.fixed_dictionaries(
    {"index": st.integers(0, 3), "finish_reason": st.sampled_from([None, "stop"])},
    optional={"delta": _delta, "text": _text},
)


@given(st.lists(_choice, max_size=2), st.booleans())
def test_the_raw_check_agrees_with_the_parsed_one(choices: list[dict[str, Any]], compact: bool) -> None:
    chunk = {"id": "c", "choices": choices}
    raw = json.dumps(chunk, separators=(",", ":") if compact else None).encode()
    assert has_output(raw) is carries_output(chunk)


@pytest.mark.parametrize(
    ("chunk", "expected"),
    [
        ({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}, True),  # OpenAI's usage chunk
        ({"choices": [{"index": 0, "delta": {"content": "x"}}], "usage": None}, True),  # vLLM, continuous usage
        ({"choices": [{"index": 0, "delta": {}}], "timings": {"predicted_ms": 9.5}}, True),  # llama.cpp
        ({"choices": [{"index": 0, "delta": {}}], "metrics": {"arrival_time": 1.0}}, True),  # vLLM's metrics
        ({"choices": [{"index": 0, "delta": {"content": "tok "}, "finish_reason": None}]}, False),
        ({"choices": [{"index": 0, "delta": {"content": 'the "usage" and "timings" keys'}}]}, False),  # escaped
    ],
)
def test_chunks_with_usage_or_timings_are_found_unparsed(chunk: dict[str, Any], expected: bool) -> None:
    for separators in ((",", ":"), (", ", ": ")):
        assert carries_measures(json.dumps(chunk, separators=separators).encode()) is expected


def test_usage_chunk() -> None:
    assert is_usage_chunk({"choices": [], "usage": {"completion_tokens": 1}})
    assert not is_usage_chunk({"choices": [{"delta": {}}], "usage": {"completion_tokens": 1}})
    assert not is_usage_chunk({"choices": [], "usage": None})


def test_assembler_builds_tool_calls_reasoning_and_logprobs() -> None:
    assembler = Assembler(chat=True)
    base = {"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    deltas: list[dict[str, Any]] = [
        {"role": "assistant", "content": ""},
        {"reasoning_content": "think"},
        {"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{"}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": "}"}}]},
    ]
    for delta in deltas:
        assembler.add(base | {"choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]})
    last = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "tool_calls", "stop_reason": None}
    assembler.add(base | {"choices": [last]})
    assembler.add(base | {"choices": [], "usage": {"completion_tokens": 3}})
    assert assembler.result() == {
        "id": "x",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "reasoning_content": "think",
                    "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
                },
                "logprobs": None,
                "finish_reason": "tool_calls",
                "stop_reason": None,
            }
        ],
        "usage": {"completion_tokens": 3},
    }


def test_assembler_names_logprobs_only_where_the_engines_chunks_do() -> None:
    """llama-server's chunks leave `logprobs` out when the request did not ask, and so does its whole answer."""
    assembler = Assembler(chat=True)
    for choice in ({"index": 0, "delta": {"content": "hi"}}, {"index": 0, "delta": {}, "finish_reason": "length"}):
        assembler.add({"id": "x", "choices": [choice]})
    assert assembler.result()["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "length"}
    ]


def test_the_usages_of_choices_reported_apart_add_up_their_completions() -> None:
    first = {"completion_tokens": 3, "prompt_tokens": 5, "total_tokens": 8}
    second = {"completion_tokens": 4, "prompt_tokens": 5, "total_tokens": 9, "prompt_tokens_details": {"x": 1}}
    assert choices_usage(None, first) == first
    assert choices_usage(first, second) == second | {"completion_tokens": 7, "total_tokens": 12}
    assert choices_usage(first, second | {"prompt_tokens": None})["total_tokens"] is None
    assert choices_usage({"completion_tokens": None}, second) == second  # no count to add to


def test_assembler_leaves_out_what_only_a_stream_has() -> None:
    """llama-server's `return_progress` adds `prompt_progress` to its first chunks; its whole answer has none."""
    assembler = Assembler(chat=True)
    progress = {"total": 26, "cache": 25, "processed": 25, "time_ms": 0}
    assembler.add({"id": "x", "choices": [{"index": 0, "delta": {"role": "assistant"}}], "prompt_progress": progress})
    assembler.add({"id": "x", "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]})
    assert "prompt_progress" not in assembler.result()


def test_assembler_concatenates_completion_logprobs_per_choice() -> None:
    assembler = Assembler(chat=False)
    for index, text in ((1, "b"), (0, "a"), (1, "c")):
        logprobs = {"tokens": [text], "token_logprobs": [-0.5], "top_logprobs": [{text: -0.5}], "text_offset": [0]}
        assembler.add({"id": "y", "choices": [{"index": index, "text": text, "logprobs": logprobs}]})
    result = assembler.result()
    assert [c["text"] for c in result["choices"]] == ["a", "bc"]
    assert result["choices"][1]["logprobs"]["tokens"] == ["b", "c"]
    assert result["object"] == "text_completion"


def test_assembler_joins_each_choices_token_ids_and_keeps_the_prompts_from_the_first_chunk() -> None:
    """vLLM's `return_token_ids`: a streamed chunk carries its own tokens' ids, a whole answer all of them; the
    prompt's ids come once, in the first chunk."""
    assembler = Assembler(chat=True)
    assembler.add({"id": "z", "prompt_token_ids": [5, 6], "choices": [{"index": 0, "delta": {"role": "assistant"}}]})
    for ids, text in (([7], "a"), ([8, 9], "bc")):
        assembler.add({"id": "z", "choices": [{"index": 0, "delta": {"content": text}, "token_ids": ids}]})
    assembler.add({"id": "z", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop", "token_ids": []}]})
    result = assembler.result()
    assert result["prompt_token_ids"] == [5, 6]
    assert result["choices"][0]["token_ids"] == [7, 8, 9]
    assert result["choices"][0]["message"]["content"] == "abc"
    unasked = Assembler(chat=False)
    unasked.add({"id": "z", "choices": [{"index": 0, "text": "a"}]})
    assert "token_ids" not in unasked.result()["choices"][0]


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        ({"type": "response.output_text.delta", "delta": "Hi"}, True),
        ({"type": "response.reasoning_text.delta", "delta": "think"}, True),
        ({"type": "response.function_call_arguments.delta", "delta": '{"a"'}, True),
        ({"type": "response.refusal.delta", "delta": "no"}, True),
        ({"type": "response.output_text.delta", "delta": ""}, False),  # nothing generated
        ({"type": "response.output_text.done", "text": "Hi"}, False),  # the whole text again
        ({"type": "response.completed", "response": {"output": [{"content": [{"text": "Hi"}]}]}}, False),
        ({"type": "response.created", "response": {"instructions": 'say "type":"response.x.delta"'}}, False),
    ],
)
def test_a_responses_output_event_is_a_non_empty_delta(event: dict[str, Any], expected: bool) -> None:
    for raw in (json.dumps(event), json.dumps(event, separators=(",", ":"))):
        assert is_response_output(raw.encode()) is expected


def test_a_responses_usage_is_the_ending_events_only() -> None:
    usage = {"input_tokens": 5, "output_tokens": 3}
    for ending in ("response.completed", "response.incomplete", "response.failed"):
        assert response_usage({"type": ending, "response": {"usage": usage}}) == usage
    assert response_usage({"type": "response.created", "response": {"usage": usage}}) is None
    assert response_usage({"type": "response.completed", "response": {"usage": None}}) is None
    assert response_usage({"type": "response.completed", "response": "not an object"}) is None


def test_assembler_keeps_the_first_error_event_apart_from_the_answer() -> None:
    assembler = Assembler(chat=True)
    base = {"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    assembler.add(base | {"choices": [{"index": 0, "delta": {"content": "par"}, "finish_reason": None}]})
    first = {"error": {"message": "out of memory", "type": "InternalServerError", "code": 500}}
    assembler.add(first)
    assembler.add({"error": {"message": "a second", "code": 400}})
    assert assembler.error == first
    assert "error" not in assembler.result()  # never merged into the answer as one of its fields
