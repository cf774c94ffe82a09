"""Where a one-stream request's time goes inside the sidecar, for `bench/reference/idle-penalty/README.md`.

`python -m bench --concurrency 1 --no-cost-split --skip-memory --sidecar-env PYTHONPATH=$PWD/bench/reference/
idle-penalty/probe --sidecar-env SIDECAR_STAGE_PROBE=1`: the medians (µs) of each stage since the request's first
byte was read, and of the first token's read to its write, go to `/tmp/stages-<pid>.json` every 20 requests. One
stream at a time: the marks are the process's, not the connection's.

With `SIDECAR_PATH_TRACE=1` instead: the calls (Python functions and C functions, in order) of one request's two
timed paths, from its first byte read to the engine's write, and from the first token's read to its write to the
client, go to `/tmp/path-<pid>.json` (the twelfth request: caches and connections made by then).
"""

import json
import os
import statistics
import sys
import threading
import time

if os.environ.get("SIDECAR_STAGE_PROBE") == "1":
    clock = time.perf_counter_ns
    marks: dict[str, int] = {}
    stages: dict[str, list[int]] = {}

    def note(name: str) -> None:
        marks[name] = clock()

    def add(stage: str, since: str) -> None:
        if since in marks:
            stages.setdefault(stage, []).append(clock() - marks[since])

    def dump() -> None:
        medians = {stage: statistics.median(times) / 1000 for stage, times in stages.items()}
        counts = {stage: len(times) for stage, times in stages.items()}
        with open(f"/tmp/stages-{os.getpid()}.json", "w") as out:
            json.dump({"median_us": medians, "count": counts}, out, indent=1)

    def patch() -> None:  # once the app is imported
        from uvicorn.protocols.http import httptools_impl

        from sidecar.dataplane import upstream_connection
        from sidecar.server import app, http_server

        protocol, cycle = http_server.HttpProtocol, httptools_impl.RequestResponseCycle
        connection = upstream_connection.Connection
        data_received, headers_complete = protocol.data_received, protocol.on_headers_complete
        run_asgi, checked, send, engine_data, client_send = (
            cycle.run_asgi,
            app._Checked.__call__,
            connection.send,
            connection.data_received,
            cycle.send,
        )

        def probed_data_received(self, data):  # type: ignore[no-untyped-def]
            if self._in_head and self._head_bytes == 0:
                note("read")
            return data_received(self, data)

        def probed_headers_complete(self):  # type: ignore[no-untyped-def]
            add("1 head parsed", "read")
            headers_complete(self)
            add("2 cycle and task made", "read")

        async def probed_run_asgi(self, asgi):  # type: ignore[no-untyped-def]
            add("3 task running", "read")
            return await run_asgi(self, asgi)

        async def probed_checked(self, scope, receive, send_):  # type: ignore[no-untyped-def]
            add("4 past the request id and log context", "read")
            return await checked(self, scope, receive, send_)

        def probed_send(self, head, body):  # type: ignore[no-untyped-def]
            add("5 key, body, JSON, admission, exchange: the engine's write begins", "read")
            return send(self, head, body)

        def probed_engine_data(self, data):  # type: ignore[no-untyped-def]
            note("engine read")
            return engine_data(self, data)

        async def probed_client_send(self, message):  # type: ignore[no-untyped-def]
            if message.get("type") == "http.response.body" and b"engine_ttft_us" in message.get("body", b""):
                add("first token: its read to its write to the client", "engine read")
                if len(stages["first token: its read to its write to the client"]) % 20 == 0:
                    dump()
            return await client_send(self, message)

        replaced = [
            (protocol, "data_received", probed_data_received),
            (protocol, "on_headers_complete", probed_headers_complete),
            (cycle, "run_asgi", probed_run_asgi),
            (cycle, "send", probed_client_send),
            (app._Checked, "__call__", probed_checked),
            (connection, "send", probed_send),
            (connection, "data_received", probed_engine_data),
        ]
        for owner, name, probed in replaced:
            setattr(owner, name, probed)

    threading.Timer(3.0, patch).start()  # the sidecar has imported its app by then; requests come after

if os.environ.get("SIDECAR_PATH_TRACE") == "1":

    class Tracing:
        requests = 0
        path: str | None = None  # the path being traced: "request" or "first_token"
        armed = False  # the request traced: its first token's path is next
        calls: dict[str, list[str]] = {"request": [], "first_token": []}
        root = "/"  # the checkout's folder, left out of its files' names

    def record(frame, event, arg):  # type: ignore[no-untyped-def]
        calls = Tracing.calls[Tracing.path or "request"]
        if event == "call":
            calls.append(f"{short(frame.f_code.co_filename)}:{frame.f_code.co_name}")
        elif event == "c_call":
            calls.append(f"C:{getattr(arg, '__qualname__', arg)}")

    def short(filename: str) -> str:
        """A file's name from its package (`sidecar/...`, `uvicorn/...`, `asyncio/...`)."""
        for root in ("site-packages/", f"python{sys.version_info[0]}.{sys.version_info[1]}/", Tracing.root):
            filename = filename.split(root)[-1]
        return filename

    def trace(path: str | None) -> None:
        Tracing.path = path
        sys.setprofile(record if path else None)

    def patch_for_trace() -> None:
        from uvicorn.protocols.http import httptools_impl

        from sidecar.dataplane import upstream_connection
        from sidecar.server import http_server

        Tracing.root = http_server.__file__.rsplit("sidecar/server/", 1)[0]
        protocol, connection = http_server.HttpProtocol, upstream_connection.Connection
        cycle = httptools_impl.RequestResponseCycle
        data_received, send, engine_data, client_send = (
            protocol.data_received,
            connection.send,
            connection.data_received,
            cycle.send,
        )

        def traced_data_received(self, data):  # type: ignore[no-untyped-def]
            Tracing.requests += 1
            if Tracing.requests == 12:
                trace("request")
            return data_received(self, data)

        def traced_send(self, head, body):  # type: ignore[no-untyped-def]
            if Tracing.path == "request":
                trace(None)
                Tracing.armed = True
            return send(self, head, body)

        def traced_engine_data(self, data):  # type: ignore[no-untyped-def]
            if Tracing.armed and b"engine_ttft_us" in data:  # the fast engine's first token
                Tracing.armed = False
                trace("first_token")
            return engine_data(self, data)

        async def traced_client_send(self, message):  # type: ignore[no-untyped-def]
            if Tracing.path == "first_token" and message.get("type") == "http.response.body":
                trace(None)
                with open(f"/tmp/path-{os.getpid()}.json", "w") as out:
                    paths = {path: {"calls": len(calls), "in_order": calls} for path, calls in Tracing.calls.items()}
                    json.dump(paths, out, indent=1)
            return await client_send(self, message)

        replaced = [
            (protocol, "data_received", traced_data_received),
            (connection, "send", traced_send),
            (connection, "data_received", traced_engine_data),
            (cycle, "send", traced_client_send),
        ]
        for owner, name, traced in replaced:
            setattr(owner, name, traced)

    threading.Timer(3.0, patch_for_trace).start()
