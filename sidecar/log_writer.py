"""Log lines to a stream, written by a thread of their own: a reader that stops reading must not stop the sidecar.

The sidecar's standard error is a pipe to whatever collects its logs (a container runtime's log driver, a shell's
pager, a CI runner). Written from the event loop, a full pipe blocked the loop in `write`: with a reader that had
stopped, the sidecar answered nothing at all after some 125 requests (64 KB of access lines), /health included.
Docker's own log drivers block so in their default mode when the driver falls behind. So records are queued
here and one thread writes them, several at a time (one `write` for what has queued meanwhile, fewer system calls
under load than one a line). What queues is bounded (`max_bytes`): past it a line is dropped and counted, and
the count is written as a line of its own once the stream takes lines again, so a stuck reader costs lines, never
the streams in flight nor the memory.

The same for the log files (`SIDECAR_LOG_DIR`): a slow disk or a network volume costs their lines' latency, never
the event loop's.

At exit what is queued is written (`flush`, registered with atexit), waiting at most `EXIT_WAIT_S` for a reader
that has stopped.
"""

from __future__ import annotations

import atexit
import json
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TextIO

MAX_BYTES = 8 * 1024 * 1024
EXIT_WAIT_S = 5.0


def stream_lines(stream: TextIO) -> Callable[[list[str]], None]:
    """Lines to a stream in one `write` and one `flush`."""

    def write(lines: list[str]) -> None:
        stream.write("\n".join(lines) + "\n")
        stream.flush()

    return write


class BackgroundWriter:
    """Lines queued by `write` from any thread, handed to `write_lines` by a thread of its own, a batch at a time."""

    def __init__(self, write_lines: Callable[[list[str]], None], max_bytes: int = MAX_BYTES) -> None:
        self.write_lines = write_lines
        self.max_bytes = max_bytes
        self._lines: deque[str] = deque()
        self._bytes = 0  # what is queued, in characters: close enough to bytes for a bound
        self._dropped = 0  # lines dropped since the last written
        self._writing = False  # the thread holds lines it has taken and not yet written
        self._closed = False
        self._changed = threading.Condition(threading.Lock())
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()
        atexit.register(self.flush, EXIT_WAIT_S)

    def write(self, line: str) -> None:
        """Queue one line (without its newline); never blocks on the stream."""
        with self._changed:
            if self._closed or self._bytes + len(line) > self.max_bytes:
                self._dropped += 1
                return
            self._lines.append(line)
            self._bytes += len(line)
            if len(self._lines) == 1:  # the thread sleeps only when nothing is queued
                self._changed.notify_all()

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until everything queued so far is written; False if that took longer than `timeout_s`."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._changed:
            while self._lines or self._writing:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._changed.wait(left)
        return True

    def close(self, timeout_s: float = EXIT_WAIT_S) -> None:
        """What is queued written (for `timeout_s` at most), then the thread ends; later lines are dropped."""
        written = self.flush(timeout_s)
        with self._changed:
            self._closed = True
            self._lines.clear()
            self._changed.notify_all()
        if written:  # else the thread is stuck in a write: a daemon, left to it
            self._thread.join(timeout_s)
        atexit.unregister(self.flush)

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._lines and not self._closed:
                    self._changed.wait()
                if self._closed:
                    return
                lines = list(self._lines)
                self._lines.clear()
                self._bytes = 0
                dropped, self._dropped = self._dropped, 0
                self._writing = True
            if dropped:  # said before the lines after the gap
                lines.insert(0, json.dumps({"event": "log_lines_dropped", "dropped": dropped, "level": "warning"}))
            try:
                self.write_lines(lines)
            except (OSError, ValueError):  # a closed stream or a full disk: logging never fails the sidecar
                pass
            with self._changed:
                self._writing = False
                self._changed.notify_all()  # a flush waiting
