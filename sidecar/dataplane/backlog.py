"""The work a finished request leaves behind (its record in the history, its metrics, its access line), done
a moment later: never between a client's next request and the engine.

A client streaming one request after another sends the next as soon as an answer ends. Done at once, the ended
answer's bookkeeping (some 250 µs at one stream, where nothing is in the CPU's caches) ran before the loop read
the new request, and the client saw it in that request's TTFT. Done right after a request went to the engine, it
was still seen (on two cores, the engine woken by the send waited for it). So it waits `DELAY_S`, time enough for
a client's next request to reach the engine; the engine is then working on that request, for longer than the
bookkeeping takes. Under load it is done in batches, the loop reading its sockets in between, so that it never
stalls the streams in flight for all of it at once: each batch a quarter of what waits (at least `BATCH`). A
fixed batch fell behind where requests end faster than loop turns come (1,024 streams on one core: 23,000
requests' bookkeeping waiting and growing, every exchange held, the garbage collector walking them all); a
quarter keeps what waits within about four turns' worth of ended requests.

Whatever reads what it writes runs all of it first (`run`: the app does so before every GET, which is how the
history, the metrics and the workers' internal calls are read), so a client that asks for its request's record
at once finds it. Each piece runs in the context it was added from: its log lines carry that request's fields.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import deque
from collections.abc import Callable

from sidecar.logs import get_logger

log = get_logger("sidecar.backlog")

# How long a finished request's bookkeeping waits, and how many requests' of it are done between two loop reads:
# a quarter of what waits, at least BATCH.
DELAY_S = 0.01
BATCH = 16
SHARE = 4


class Backlog:
    def __init__(self, delay_s: float = DELAY_S, batch: int = BATCH) -> None:
        self.delay_s = delay_s
        self.batch = batch
        self._work: deque[tuple[contextvars.Context, Callable[[], None]]] = deque()
        self._handle: asyncio.Handle | None = None  # the timer, or the next batch's turn in the loop

    def __len__(self) -> int:
        return len(self._work)

    def add(self, work: Callable[[], None]) -> None:
        """Do `work` later, in the current context."""
        self._work.append((contextvars.copy_context(), work))
        if self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(self.delay_s, self._next_batch)

    def run(self) -> None:
        """Everything waiting, now."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._do(len(self._work))

    def _next_batch(self) -> None:
        self._handle = None
        self._do(max(self.batch, len(self._work) // SHARE))
        if self._work:
            self._handle = asyncio.get_running_loop().call_soon(self._next_batch)

    def _do(self, count: int) -> None:
        work = self._work
        for _ in range(min(count, len(work))):
            context, each = work.popleft()
            try:
                context.run(each)
            except Exception:  # one request's bookkeeping must not cost the others theirs
                log.exception("bookkeeping_failed")
