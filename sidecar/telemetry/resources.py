"""What one sidecar process may use of the machine: file descriptors, and the memory a burst leaves behind.

Descriptors bound how many streams a process carries. Every stream holds two, its client's connection and the
engine's, and a container's soft limit is often 1024. At start-up the soft limit is raised to the hard one (vLLM
and SGLang raise theirs too); the workers and the engine inherit it. Past it, a connection to the engine cannot be
opened: had the sidecar let every client in, the clients' own connections would take the last descriptors and no
request could be served at all. So client connections past half the limit (less a reserve) are answered 503 at
once (`http_server`), and a request that finds no descriptor for the engine anyway gets a 503 too, not a 502 that
blames the engine (`proxy`).

Memory: glibc's malloc takes a large block (a request body of megabytes) from mmap and gives it back to the system
when it is freed, but then raises its threshold to that block's size, so that the next such blocks come from the
heap, which it keeps: after 32 bodies of 15 MB in flight the sidecar stayed at 1,040 MB. The threshold is fixed at
glibc's default at start-up, as `MALLOC_MMAP_THRESHOLD_` would fix it: the same burst left it at 71 MB. Smaller
blocks come from the heap, whose free top glibc gives back past 128 KiB: the reads of a large answer (an embeddings
answer of 1.4 MB comes in reads of 64 KiB) were given back after each request and faulted in again page by page by
the next, half the sidecar's CPU on such an answer. Up to 16 MiB of it is kept for the next requests
(`MALLOC_TRIM_THRESHOLD_`'s setting): 2.2 ms of CPU an answer became 1.2-1.5 (`python -m bench.embeddings`).
Where the sidecar's environment sets either variable, glibc's reading of it stands.
"""

from __future__ import annotations

import ctypes
import os
import resource
from typing import Any

from sidecar.logs import get_logger
from sidecar.settings import Settings

log = get_logger("sidecar.resources")

# Held whatever the traffic: the sidecar's listening sockets, log files, the engine's pipes, the watchdog's reads.
_RESERVED = 64
# Streams a sidecar with no admission limit should be able to carry before it says its limit is low.
_EXPECTED_STREAMS = 1024
# glibc's mallopt parameters, by the variables that set them: blocks from 128 KiB up are mapped, and unmapped when
# freed (glibc's default, kept fixed); up to 16 MiB free at the heap's top is kept.
_MALLOPT = {"MALLOC_MMAP_THRESHOLD_": (-3, 128 * 1024), "MALLOC_TRIM_THRESHOLD_": (-1, 16 * 1024 * 1024)}


def open_files_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def connections_allowed() -> int:
    """Client connections this process can serve, each with its connection to the engine."""
    return max(1, (open_files_limit() - _RESERVED) // 2)


def raise_open_files_limit(settings: Settings) -> None:
    """The soft limit raised to the hard one; one line says how many streams it allows, a warning where that is
    fewer than the admission limits let in (without them, 1024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fields: dict[str, Any] = {}
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20  # Linux's default ceiling (fs.nr_open)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            fields["not_raised"] = str(exc)
        else:
            fields["raised_from"] = soft
    streams = connections_allowed()
    limited = settings.max_concurrent_requests
    needed = limited + settings.max_queued_requests if limited else _EXPECTED_STREAMS
    fields |= {"limit": open_files_limit(), "streams_at_most": streams}
    if streams < needed:
        log.warning("open_files_limit_low", streams_needed=needed, **fields)
    else:
        log.info("open_files_limit", **fields)


def set_malloc_thresholds() -> None:
    """Large blocks always mapped and unmapped, never kept in the heap after a burst; the heap's free top kept up to
    16 MiB. Glibc only: elsewhere, and where the C library has no `mallopt`, nothing changes; nor where the
    environment sets the variable (glibc read it at start-up)."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # the process's own C library
    if mallopt is None:
        return
    for variable, (parameter, value) in _MALLOPT.items():
        if variable not in os.environ:
            mallopt(parameter, value)
