"""uvicorn (httptools, uvloop) and the sidecar's engine client, nothing else: the body read and sent, the answer
relayed as it is read, with no key, JSON, admission, measure or middleware. `python bare_uvicorn.py PORT
ENGINE_PORT`, then `python -m bench --target http://127.0.0.1:PORT --target-pid PID --engine-port ENGINE_PORT`."""

import sys

import uvicorn
from starlette.types import Receive, Scope, Send

from sidecar.dataplane.upstream import UpstreamPool

_pool: UpstreamPool | None = None


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    global _pool
    if scope["type"] != "http":
        return
    if _pool is None:  # made on the server's loop
        _pool = UpstreamPool(5.0, 4.0, None)
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    engine = f"http://127.0.0.1:{sys.argv[2]}"
    response = await _pool.request("POST", engine, scope["path"], [(b"content-type", b"application/json")], body)
    headers = [(b"content-type", (response.content_type or "text/plain").encode())]
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    while chunk := await response.readany():
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    response.close()
    await send({"type": "http.response.body", "body": b""})


if __name__ == "__main__":
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=int(sys.argv[1]),
        http="httptools",
        loop="uvloop",
        access_log=False,
        log_level="warning",
        lifespan="off",
        proxy_headers=False,
    )
