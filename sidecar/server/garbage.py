"""Python's garbage collector run on a clock rather than on counts of new objects.

The sidecar's requests make no reference cycles (a test holds each path to it: tests/test_garbage.py), so what
frees their objects is reference counting, at once; the collector only has cycles made elsewhere to find (httpx's
closed connections to the engine's probes, a library's exception kept with its traceback). Python's own trigger,
a count of new objects, does not know that: at 1024 streams on one core it ran some 20 young collections a second,
each walking the objects of the streams in flight (3 ms on average), a middle one about every second (up to 105 ms)
and a full one now and then (up to 145 ms): a tenth of the sidecar's CPU, and nothing found to free.

So: what start-up made is frozen out of the collector (it lives as long as the process), automatic collection is
off, and `collect_periodically` runs a young-and-middle collection every `EVERY_S` and a full one every
`FULL_EVERY`-th time, on the event loop (as automatic collection would have run, so that finalizers run on the
loop's thread). A collection still walks what is in flight (40-100 ms at 1024 streams on one core, as the middle
ones did), now once every ten seconds; a cycle made in between waits at most that long to be freed. Measured in
`bench/reference/gc-clock-ab/` (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import gc

EVERY_S = 10.0
FULL_EVERY = 6  # the oldest generation too, once a minute: what survived two collections and then became garbage


def take_over() -> None:
    """Before serving: start-up's objects frozen, automatic collection off (`collect_periodically` does it)."""
    gc.collect()
    gc.freeze()
    gc.disable()


async def collect_periodically(every_s: float = EVERY_S, full_every: int = FULL_EVERY) -> None:
    """Until cancelled: a collection every `every_s`, every `full_every`-th of them a full one."""
    collections = 0
    while True:
        await asyncio.sleep(every_s)
        collections += 1
        gc.collect(2 if collections % full_every == 0 else 1)
