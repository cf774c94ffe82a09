"""`python -m sidecar.control.guard SIDECAR_PID ENGINE_PGID GRACE_S`: the engine dies with the sidecar, however it dies.

The sidecar starts one guard beside each engine, in a session of its own, and kills it once it has stopped the
engine itself. If the sidecar dies first (SIGKILL included), the kernel sends the guard SIGTERM (its parent-death
signal), and the guard stops the engine's whole process group as the sidecar would have: SIGTERM, then SIGKILL
after the grace period. The engine's leader also gets SIGTERM from the kernel when the sidecar dies; the guard is
for what the leader leaves behind (vLLM's workers) and for an engine that ignores SIGTERM. Standard library
only: it starts in milliseconds.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def prctl(option: int, value: int) -> None:
    """Linux's prctl(2) for this process (a no-op elsewhere)."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel for `sig` when the thread that started this process ends."""
    prctl(PR_SET_PDEATHSIG, sig)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, though not ours to signal
        return True
    return True


def stop_group(pgid: int, grace_s: float) -> None:
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and group_alive(pgid):
        time.sleep(0.05)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def main(argv: list[str]) -> int:
    sidecar_pid, pgid, grace_s = int(argv[0]), int(argv[1]), float(argv[2])
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
    die_with_parent()
    while os.getppid() == sidecar_pid:  # else the sidecar died before (or while) the guard was set up
        if signal.sigtimedwait({signal.SIGTERM}, 1.0) is not None:
            break
        if not group_alive(pgid):
            return 0  # the engine is gone: nothing left to guard
    stop_group(pgid, grace_s)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
