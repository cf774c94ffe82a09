"""Unit tests of what the proxy reads of a generation request and the change it makes to the client's bytes."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sidecar.dataplane.generation_request import asking_for_usage, generation_fields, whole_only
from sidecar.errors import BadRequest
from sidecar.http import json_object

USAGE = {"stream_options": {"include_usage": True}}


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model":"m","stream":true,"messages":[{"role":"user","content":"}{"}]}',
        b'{"model": "m", "stream": true}  \r\n',
        b'{"stream":true,"messages":[{"content":"\xc3\xa9 \\u00e9"}]}',
    ],
)
def test_usage_is_spliced_into_the_clients_bytes_as_serializing_would_add_it(raw: bytes) -> None:
    body = json_object(raw)
    spliced = asking_for_usage(raw, body)
    assert spliced is not None
    assert json.loads(spliced) == body | USAGE
    assert spliced.startswith(raw[: raw.rfind(b"}")])  # the client's bytes kept as they were, up to the brace


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"])
def test_a_body_not_in_plain_utf8_is_not_spliced(encoding: str) -> None:
    raw = json.dumps({"model": "m", "stream": True}).encode(encoding)
    assert asking_for_usage(raw, json_object(raw)) is None  # serialized again instead, as UTF-8


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m"},
        {"model": "m", "stream": False},
        {"model": "m", "stream": True, "stream_options": {"include_usage": False}},
        {"model": "m", "stream": True, "stream_options": None},
    ],
)
def test_only_a_streamed_body_without_stream_options_is_spliced(body: dict[str, Any]) -> None:
    assert asking_for_usage(json.dumps(body).encode(), body) is None


def test_the_fields_acted_on_are_read_with_their_defaults() -> None:
    assert generation_fields({}) == (False, None, 1)
    assert generation_fields({"stream": None, "n": None}) == (False, None, 1)
    assert generation_fields({"stream": True, "stream_options": {"include_usage": True}, "n": 3}) == (
        True,
        {"include_usage": True},
        3,
    )


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"stream": "yes"}, "stream"),
        ({"stream": 1}, "stream"),
        ({"stream_options": ["include_usage"]}, "stream_options"),
        ({"stream": True, "stream_options": {"include_usage": "true"}}, "stream_options.include_usage"),
        ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
        ({"n": "2"}, "n"),
        ({"n": True}, "n"),
        ({"n": 1.5}, "n"),
    ],
)
def test_a_field_of_the_wrong_type_is_the_clients_400_naming_it(body: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequest) as raised:
        generation_fields(body)
    assert raised.value.param == param


@pytest.mark.parametrize(
    ("fields", "whole"),
    [
        ({}, False),
        ({"prompt_logprobs": None, "background": False, "use_beam_search": False, "echo": False}, False),
        ({"stream_options": None}, False),
        ({"stream_options": {}}, False),  # as vLLM: an empty object is no options
        ({"prompt_logprobs": 0}, True),  # each prompt token's own logprob, no others: only in a whole answer
        ({"echo": True}, True),
        ({"stream_options": {"include_usage": True}}, True),
        ({"prompt_logprobs": 2}, True),
        ({"prompt_logprobs": -1}, True),
        ({"use_beam_search": True}, True),
        ({"kv_transfer_params": {"do_remote_decode": True}}, True),
        ({"ec_transfer_params": {}}, True),
        ({"background": True}, True),
    ],
)
def test_what_only_a_whole_answer_has_is_not_streamed_for_assembly(fields: dict[str, Any], whole: bool) -> None:
    assert whole_only({"model": "m", "messages": []} | fields) is whole
