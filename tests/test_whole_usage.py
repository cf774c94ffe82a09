"""An answer's usage read from its end or its head, the rest not parsed (`sidecar/dataplane/whole_usage.py`)."""

from __future__ import annotations

import json

import pytest

from sidecar.dataplane.whole_usage import split_at_usage

EMBEDDINGS = (
    b'{"id":"embd-1","object":"list","created":0,"model":"m","data":[{"index":0,"object":"embedding",'
    b'"embedding":[0.25,-0.5]}],"usage":{"prompt_tokens":3,"total_tokens":3,"completion_tokens":0}}'
)


def test_only_the_end_of_a_large_answer_is_copied() -> None:
    parts = [b'{"data":[' + b"0.125," * 20_000, b"0.25," * 1000 + b'0.5],"usage"', b' : {"prompt_tokens": 1}\n}\n']
    found = split_at_usage(parts)
    assert found is not None
    before, usage, after = found
    assert before[0] is parts[0] and usage == {"prompt_tokens": 1} and after == [b"\n}\n"]
    assert b"".join([*before, b'{"prompt_tokens": 1}', *after]) == b"".join(parts)


@pytest.mark.parametrize(
    "answer",
    [
        b'{"data":[],"usage":{"prompt_tokens":1},"id":"x"}',  # neither the last member nor after scalars only
        b'{"data":[{"usage":{"prompt_tokens":1}}]}',  # a member of a nested object
        b'{"data":[],"usage":{"details":{"usage":{}}}}',  # nested in the usage's own value
        b'{"my\\"usage":{"prompt_tokens":1}}',  # another key, ending with the word
        b'{"text":"the \\"usage\\":{}","n":{}}',  # the word in a string
        b'{"data":[],"usage":null}',  # not an object
        b'[{"usage":{"prompt_tokens":1}}]',  # not an object answer
        b'{"data":[],"usage":{"prompt_tokens":1}',  # cut short
        b'{"model":"m","usage":[1],"data":[]}',  # not an object, at the head
        b'{"model":"m","usage":{"prompt_tokens":1},"data":[]',  # cut short, at the head
        b"",
    ],
)
def test_an_answer_whose_usage_is_at_neither_edge_is_left_to_be_parsed(answer: bytes) -> None:
    assert split_at_usage([answer]) is None


# llama-server's order: its model and object, the usage, then its data.
LEADING = (
    b'{"model":"m","object":"list","usage":{"prompt_tokens":3,"total_tokens":3},'
    b'"data":[{"embedding":[0.25,-0.5],"index":0,"object":"embedding"}]}'
)
USAGES = {
    EMBEDDINGS: {"prompt_tokens": 3, "total_tokens": 3, "completion_tokens": 0},
    LEADING: {"prompt_tokens": 3, "total_tokens": 3},
}


@pytest.mark.parametrize(("answer", "cut"), [(answer, cut) for answer in USAGES for cut in range(1, len(answer))])
def test_a_usage_at_the_answers_end_or_head_is_found_in_the_parts_it_was_read_in(answer: bytes, cut: int) -> None:
    """Wherever the reads cut the answer, the usage is found and the bytes around it are the engine's own."""
    found = split_at_usage([answer[:cut], answer[cut:]])
    assert found is not None
    before, usage, after = found
    assert usage == USAGES[answer]
    assert b"".join([*before, json.dumps(usage, separators=(",", ":")).encode(), *after]) == answer


def test_a_usage_at_the_head_is_read_to_its_own_end_nested_objects_and_braces_in_strings_included() -> None:
    answer = (
        b'{ "model": "m \\"usage\\": {}", "n": -1.5e3, "ok": true, "usage": {"details": {"cached": 1}, "note": "}"} ,'
        b' "data": [' + b"0.125," * 20_000 + b"0.5]}"
    )
    parts = [answer[:5000], answer[5000:]]
    found = split_at_usage(parts)
    assert found is not None
    before, usage, after = found
    assert usage == {"details": {"cached": 1}, "note": "}"}
    assert after[-1] is parts[1]  # the rest as it was read
    assert b"".join([*before, b'{"details": {"cached": 1}, "note": "}"}', *after]) == answer
