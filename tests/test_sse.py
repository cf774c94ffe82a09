from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.dataplane import sse
from sidecar.dataplane.sse import Event, EventTooLarge, SSEParser

STREAM = (
    b'data: {"choices":[{"delta":{"role":"assistant"}}]}\n\n'
    b": keep-alive comment\n\n"
    b'data: {"choices":[{"delta":{"content":"a\\nb"}}]}\r\n\r\n'
    b"event: message\r\ndata: line one\r\ndata:line two\r\rid: 7\n\n"
    b"data: [DONE]\n\n"
)
EXPECTED = [
    Event(b'data: {"choices":[{"delta":{"role":"assistant"}}]}\n\n', b'{"choices":[{"delta":{"role":"assistant"}}]}'),
    Event(b": keep-alive comment\n\n", None),
    Event(b'data: {"choices":[{"delta":{"content":"a\\nb"}}]}\r\n\r\n', b'{"choices":[{"delta":{"content":"a\\nb"}}]}'),
    Event(b"event: message\r\ndata: line one\r\ndata:line two\r\r", b"line one\nline two"),
    Event(b"id: 7\n\n", None),
    Event(b"data: [DONE]\n\n", b"[DONE]"),
]


def parse(chunks: list[bytes]) -> list[Event]:
    parser = SSEParser()
    events = [event for chunk in chunks for event in parser.feed(chunk)]
    return events + parser.close()


def test_whole_stream_in_one_read() -> None:
    assert parse([STREAM]) == EXPECTED


def test_raw_bytes_of_all_events_are_the_stream() -> None:
    assert b"".join(e.raw for e in parse([STREAM])) == STREAM


def test_byte_by_byte() -> None:
    assert parse([STREAM[i : i + 1] for i in range(len(STREAM))]) == EXPECTED


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=40))
def test_any_split_gives_the_same_events(cuts: list[int]) -> None:
    points = sorted(set(cuts))
    chunks = [STREAM[a:b] for a, b in zip([0, *points], [*points, len(STREAM)], strict=True)]
    assert parse(chunks) == EXPECTED


def test_crlf_split_between_reads_is_one_line_end() -> None:
    assert parse([b"data: x\r", b"\n\r", b"\n"]) == [Event(b"data: x\r\n\r\n", b"x")]


def test_unterminated_last_event_is_flushed_at_close() -> None:
    assert parse([b"data: a\n\ndata: b"]) == [Event(b"data: a\n\n", b"a"), Event(b"data: b", b"b")]
    assert parse([b"data: c\r"]) == [Event(b"data: c\r", b"c")]
    assert parse([]) == []


def test_fields_that_only_look_like_data_are_not_data() -> None:
    assert parse([b"database: x\ndata\n\n"]) == [Event(b"database: x\ndata\n\n", b"")]


_line = st.text(alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=20)


@given(st.lists(st.tuples(st.sampled_from(["data: ", "data:", ": ", "event: "]), _line), min_size=1, max_size=5))
def test_a_read_of_whole_events_parses_as_it_does_byte_by_byte(fields: list[tuple[str, str]]) -> None:
    stream = b"".join(f"{name}{value}\n\n".encode() for name, value in fields)
    assert parse([stream]) == parse([stream[i : i + 1] for i in range(len(stream))])


def test_an_event_still_incomplete_past_the_bound_is_refused() -> None:
    parser = SSEParser(max_event_bytes=100)
    assert parser.feed(b"data: " + b"a" * 50) == []
    data = b"a" * 50 + b"b" * 40
    assert parser.feed(b"b" * 40 + b"\n\n") == [Event(b"data: " + data + b"\n\n", data)]
    assert parser.feed(b"data: " + b"c" * 90) == []  # the event before it is no longer held
    with pytest.raises(EventTooLarge):
        parser.feed(b"c" * 10)


class _CountingSearch:
    """The parser's line-end pattern, counting the bytes each search may look at."""

    def __init__(self, pattern: re.Pattern[bytes]) -> None:
        self.pattern = pattern
        self.looked_at = 0

    def search(self, buffer: bytearray, position: int) -> re.Match[bytes] | None:
        self.looked_at += len(buffer) - position
        return self.pattern.search(buffer, position)


def test_a_long_line_in_many_reads_is_searched_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each read's bytes are searched for a line end once, not the whole line again on every read: an engine's line
    of 100 MB, searched from its start on each 64 KB read, held the event loop for half a minute."""
    counting = _CountingSearch(sse._LINE_END)
    monkeypatch.setattr(sse, "_LINE_END", counting)
    parser = SSEParser()
    reads = [b"data: ", *[b"x" * 1000] * 1000, b"\r", b"\n\r\n", b"data: next\n", b"\n"]
    events = [event for read in reads for event in parser.feed(read)]
    assert [len(event.data or b"") for event in events] == [1_000_000, 4]
    assert counting.looked_at < 2 * sum(map(len, reads))
