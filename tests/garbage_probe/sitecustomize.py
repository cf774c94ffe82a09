"""Loaded into a sidecar under test through PYTHONPATH, when GARBAGE_PROBE_DIR is set: what the garbage collector
finds unreachable is kept rather than freed (`gc.DEBUG_SAVEALL`), and when `<dir>/<pid>.trigger` appears, a
collection runs and the objects kept so far are counted by type into `<dir>/<pid>.json` (the trigger removed once
it is written). Each process watches for its own pid: the engine the sidecar starts may inherit this too."""

from __future__ import annotations

import collections
import gc
import json
import os
import threading
import time


def _watch(directory: str) -> None:
    trigger = os.path.join(directory, f"{os.getpid()}.trigger")
    report = os.path.join(directory, f"{os.getpid()}.json")
    while True:
        if os.path.exists(trigger):
            gc.collect()  # kept, not freed: no finalizer runs on this thread
            counts = collections.Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.garbage)
            with open(report + ".tmp", "w") as out:
                out.write(json.dumps(counts))  # not json.dump, whose pure-Python encoder makes cycles of its own
            os.replace(report + ".tmp", report)
            os.remove(trigger)
        time.sleep(0.02)


if os.environ.get("GARBAGE_PROBE_DIR"):
    gc.set_debug(gc.DEBUG_SAVEALL)
    threading.Thread(target=_watch, args=(os.environ["GARBAGE_PROBE_DIR"],), name="garbage-probe", daemon=True).start()
