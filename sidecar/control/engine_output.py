"""An engine's output: its stdout and stderr split into lines as the bytes come, masked, logged (at most a rate),
the last ones kept for errors and status, and handed to live readers (`GET /v1/model/logs`)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import time
from collections.abc import Iterator, Sequence

from sidecar.logs import LineBudget, get_logger
from sidecar.redaction import Redactor

log = get_logger("sidecar.engine")

TAIL_LINES = 100
FOLLOW_BUFFER = 1000  # lines a live reader of the output may fall behind before it misses some
_MAX_LINE = 16 * 1024  # a line longer than this is logged in pieces
_UNLOGGED_EVERY_S = 5.0  # while the engine's output is past its rate, how often the lines not logged are counted


class OutputFollower:
    """One reader of the engine's output as it comes (`GET /v1/model/logs`): its lines, masked, then None when
    the output ends (the process and its pipes are gone) or the reader is let go. Bounded: a reader that falls
    FOLLOW_BUFFER lines behind misses the next ones, counted in `dropped`, and never holds the engine up."""

    def __init__(self) -> None:
        self.lines: asyncio.Queue[tuple[str, str] | None] = asyncio.Queue()
        self.dropped = 0

    def push(self, stream: str, line: str) -> None:
        if self.lines.qsize() >= FOLLOW_BUFFER:
            self.dropped += 1
        else:
            self.lines.put_nowait((stream, line))

    def close(self) -> None:
        self.lines.put_nowait(None)


class EngineOutput:
    """One engine's output. Lines are split on `\\n` and `\\r` (progress bars) as the bytes arrive, never waiting
    for a line's end, and a read's lines are handled together, so that a flood costs a read at a time.

    At most `lines_per_s` lines a second go into the log (0: every line); every line is kept in the tail and goes
    to followers whatever the rate, and what was not logged is counted in a warning. The `masked` values,
    registered with the redactor for this engine, are forgotten once the output has ended: nothing the engine
    writes after can hold them."""

    def __init__(self, name: str, redactor: Redactor, lines_per_s: float = 0, masked: Sequence[str] = ()) -> None:
        self.name = name
        self.ended = False
        self._redactor = redactor
        self._masked: Sequence[str] | None = masked
        self._logged = _LoggedOutput(name, lines_per_s)
        self._tail: collections.deque[tuple[str, str]] = collections.deque(maxlen=TAIL_LINES)
        self._followers: set[OutputFollower] = set()
        self._partial = {1: b"", 2: b""}

    # -- from the process's pipes -------------------------------------------------------------------------------

    def feed(self, fd: int, data: bytes) -> None:
        buffer = self._partial.get(fd, b"") + data
        lines = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        self._partial[fd] = lines.pop()
        while len(self._partial[fd]) > _MAX_LINE:
            lines.append(self._partial[fd][:_MAX_LINE])
            self._partial[fd] = self._partial[fd][_MAX_LINE:]
        if lines := [line for line in lines if line.strip()]:
            self._lines("stdout" if fd == 1 else "stderr", lines)

    def pipe_closed(self, fd: int) -> None:
        rest = self._partial.pop(fd, b"")
        if rest.strip():
            self._lines("stdout" if fd == 1 else "stderr", [rest])

    def end(self) -> None:
        """The process exited and every pipe is closed: no more output."""
        self.ended = True
        self._logged.report()
        self.let_followers_go()
        self.forget_masked()

    def forget_masked(self) -> None:
        """Once: an output's end after a failed start must not undo another engine's hold on the same values."""
        if self._masked is not None:
            self._redactor.forget(*self._masked)
            self._masked = None

    # -- for status, errors and readers ---------------------------------------------------------------------------

    def tail(self, lines: int = TAIL_LINES) -> list[str]:
        return [line for _, line in list(self._tail)[-lines:]] if lines else []

    @contextlib.contextmanager
    def follow(self, tail: int = TAIL_LINES) -> Iterator[tuple[list[tuple[str, str]], OutputFollower]]:
        """The last `tail` lines kept, (stream, line), and a follower of the lines after them: none missed or
        repeated between the two. A follower of an output that has ended is closed at once."""
        follower = OutputFollower()
        if self.ended:
            follower.close()
        else:
            self._followers.add(follower)
        try:
            yield (list(self._tail)[-tail:] if tail else []), follower
        finally:
            self._followers.discard(follower)

    @property
    def followers(self) -> int:
        return len(self._followers)

    def let_followers_go(self) -> None:
        """Live readers end now (the output's end, or the sidecar stopping: the server's drain must not wait)."""
        for follower in self._followers:
            follower.close()
        self._followers.clear()

    def _lines(self, stream: str, lines: list[bytes]) -> None:
        # The first `to_log` are logged; with no follower, those past them that the read's own last TAIL_LINES
        # push out of the tail are only counted: a flood costs a split, not a mask, per line.
        to_log = self._logged.take(len(lines))
        kept_from = to_log if self._followers else max(to_log, len(lines) - TAIL_LINES)
        for index in itertools.chain(range(to_log), range(kept_from, len(lines))):
            line = self._redactor.redact_text(lines[index].decode(errors="replace"))
            self._tail.append((stream, line))
            if index < to_log:
                log.info("engine_output", engine=self.name, stream=stream, line=line)
            for follower in self._followers:
                follower.push(stream, line)


class _LoggedOutput:
    """How many of the engine's lines go into the log: at most `per_s` a second (`LineBudget`). Those past it are
    counted in an `engine_output_unlogged` warning: the first at once, then at most one every 5 s for as long as
    they go on, the last 5 s after them (or when the output ends), so that every line not logged is counted."""

    def __init__(self, name: str, per_s: float) -> None:
        self.name, self.per_s = name, per_s
        self.budget = LineBudget(per_s)
        self.unlogged = 0
        self.reported_at = -_UNLOGGED_EVERY_S
        self.due: asyncio.TimerHandle | None = None

    def take(self, lines: int) -> int:
        """How many of the next `lines` to log (the first ones); the rest are counted."""
        logging = self.budget.take(lines)
        if logging < lines:
            self.unlogged += lines - logging
            if self.due is None:
                wait = self.reported_at + _UNLOGGED_EVERY_S - time.monotonic()
                if wait <= 0:
                    self.report()
                else:
                    self.due = asyncio.get_running_loop().call_later(wait, self.report)
        return logging

    def report(self) -> None:
        """The lines not logged since the last report, reported (where there are any)."""
        if self.due is not None:
            self.due.cancel()
            self.due = None
        if self.unlogged:
            log.warning("engine_output_unlogged", engine=self.name, lines=self.unlogged, lines_per_s=self.per_s)
            self.unlogged = 0
            self.reported_at = time.monotonic()
