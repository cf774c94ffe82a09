"""The machine a run measured, as far as its figures depend on it: its cores and platform, and how much slower
Python code runs on a core that was idle than on one kept busy (`idle_penalty`).

At one stream a proxy's work on a request runs after an idle wait: the client's request after the last answer, the
first token after the engine's TTFT. On a virtual machine whose idle vCPU the host gives to other work, the code
then runs from cold caches and branch predictors, several times slower than when the core is kept busy; nginx's
path is short and mostly the kernel's, a Python relay's is many small steps, each paying it. The one-stream added
TTFT over nginx's moves with this figure more than with the code: the bench prints it beside that verdict.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

IDLE_S = 0.02  # the fast engine's default time to first token: the idle a first token's relay runs after
_REQUEST = {"model": "mock-model", "stream": True, "messages": [{"role": "user", "content": "hello"}]}


def _workload() -> None:
    """A few small Python steps of the kind a request's path is made of: JSON in and out, dicts, calls."""
    for _ in range(20):
        json.loads(json.dumps(_REQUEST))


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _median_after(wait: Callable[[float], None], idle_s: float, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        wait(idle_s)
        start = time.perf_counter_ns()
        _workload()
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times)


def idle_penalty(idle_s: float = IDLE_S, rounds: int = 40) -> float:
    """The median time of a small Python workload after `idle_s` asleep over its median after as long kept busy:
    about 1 where a core wakes as it slept, 2-3 on the 2-core VMs these figures were taken on."""
    after_busy = _median_after(_busy, idle_s, rounds)
    after_sleep = _median_after(time.sleep, idle_s, rounds)
    return round(after_sleep / after_busy, 2)


def describe(idle: bool) -> dict[str, Any]:
    """The machine's fields of a results file; the idle penalty where the run measured one stream (`idle`)."""
    machine: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
    }
    if idle:
        machine["idle_penalty"] = idle_penalty()
    return machine
