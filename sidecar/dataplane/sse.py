"""An incremental Server-Sent Events parser for the proxy's hot path.

It yields each event's raw bytes exactly as they arrived (the proxy forwards them unchanged) and its `data`
field, whatever way the stream was cut into reads: events split across reads, several in one read, `\\n`,
`\\r\\n` or `\\r` line ends, comments.

It holds one event at a time, and each byte is searched for a line end once: a line that comes in many reads is
not searched again from its start on each (an engine's 100 MB line took the relay 30 s that way, its event loop
stalled for most of a second at a time). Past `max_event_bytes` an event is refused (`EventTooLarge`) rather
than held: an engine whose event never ends would otherwise take the sidecar's memory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LINE_END = re.compile(rb"\r\n|\n|\r")
DONE = b"[DONE]"


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs twice as much, on every event relayed
class Event:
    raw: bytes  # the event as received, its blank line included
    data: bytes | None  # the data lines joined with "\n"; None for an event without data (a comment, a ping)


class EventTooLarge(ValueError):
    """An event grew past the parser's `max_event_bytes` before it ended."""


class SSEParser:
    def __init__(self, max_event_bytes: int | None = None) -> None:
        self.max_event_bytes = max_event_bytes
        self._buffer = bytearray()  # the event being read; after a feed, nothing before it
        self._start = 0  # where the event being read begins (the ones before it go at the end of the feed)
        self._position = 0  # where the next line starts
        self._searched = 0  # where the search for the next line end resumes
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[Event]:
        fast = self.whole_events(chunk)
        if fast is not None:
            return fast
        self._buffer += chunk
        events: list[Event] = []
        buffer = self._buffer
        while True:
            match = _LINE_END.search(buffer, self._searched)
            if match is None:
                self._searched = len(buffer)
                break
            if match.group() == b"\r" and match.end() == len(buffer):
                self._searched = match.start()  # maybe the first half of "\r\n": looked at again with the next read
                break
            line = buffer[self._position : match.start()]
            self._position = self._searched = match.end()
            if line:
                self._field(line)
            else:
                events.append(self._dispatch())
        if self._start:  # the events dispatched leave the buffer at once, not one by one
            del buffer[: self._start]
            self._position -= self._start
            self._searched -= self._start
            self._start = 0
        if self.max_event_bytes is not None and len(buffer) > self.max_event_bytes:
            raise EventTooLarge(f"an event over {self.max_event_bytes} bytes")
        return events

    def whole_events(self, chunk: bytes) -> list[Event] | None:
        """The events of a read made of whole one-line `data: ` events, where no event begun before it is held: the
        engines' usual read, without the line-by-line walk. None for any other read, the parser left as it was."""
        if self._buffer or not chunk.endswith(b"\n\n") or b"\r" in chunk:
            return None
        return _whole_data_events(chunk)

    def close(self) -> list[Event]:
        """The end of the stream ends its last line and its last event, terminated or not."""
        if len(self._buffer) == self._start:
            return []
        rest = self._buffer[self._position :]
        if rest.endswith(b"\r"):
            rest = rest[:-1]
        if rest:
            self._field(rest)
        self._position = len(self._buffer)
        return [self._dispatch()]

    def _field(self, line: bytearray) -> None:
        if line.startswith(b"data"):  # the only field the proxy needs; comments and others pass through
            name, _, value = bytes(line).partition(b":")
            if name == b"data":
                self._data.append(value[1:] if value.startswith(b" ") else value)

    def _dispatch(self) -> Event:
        raw = bytes(self._buffer[self._start : self._position])
        self._start = self._position
        data = b"\n".join(self._data) if self._data else None
        self._data = []
        return Event(raw, data)


def _whole_data_events(chunk: bytes) -> list[Event] | None:
    """The engines' usual read, one or a few events of one `data: ` line each, without the line-by-line walk.

    None when the read is anything else: the general parser takes it then.
    """
    if chunk.find(b"\n") == len(chunk) - 2:  # one line, then the blank line: one event
        return [Event(chunk, chunk[6:-2])] if chunk.startswith(b"data: ") else None
    events = []
    start, end = 0, len(chunk)
    while start < end:  # each event's one line, then its blank line, sliced out where it lies
        line_end = chunk.find(b"\n", start)
        if chunk[line_end + 1 : line_end + 2] != b"\n" or not chunk.startswith(b"data: ", start):
            return None
        events.append(Event(chunk[start : line_end + 2], chunk[start + 6 : line_end]))
        start = line_end + 2
    return events
