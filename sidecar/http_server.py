"""The sidecar's HTTP/1.1 server protocol: uvicorn's on httptools, with a bound on a request's head and the
errors it makes itself in the OpenAI shape.

httptools (llhttp) bounds neither the request line nor the headers, and uvicorn adds no bound of its own for
it: one client sending a single 200 MB header had the sidecar keep all of it (RSS up 300 MB) and spend a
minute of its event loop growing the value piece by piece (httptools appends each read to the bytes so far,
so the copying is quadratic), every stream stalled meanwhile. nginx refuses a head past 32 KB, Envoy past
60 KiB, vLLM since GHSA-rxc4-3w6r-4v47 bounds it too; here it is `SIDECAR_MAX_HEADER_BYTES` (64 KiB), 431.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from sidecar.errors import BadRequest, RequestHeadersTooLarge, SidecarError
from sidecar.logs import get_logger

log = get_logger("sidecar.http")


class _HeadTooLarge(Exception):
    """Raised in the parser's callback: httptools stops there and uvicorn answers through `send_400_response`."""


class HttpProtocol(HttpToolsProtocol):
    max_head_bytes: ClassVar[int] = 64 * 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # between the end of one request (or the connection's start) and the next one's headers
        self._head_bytes = 0  # bytes read meanwhile: the head, and at most a read's worth of what came around it
        self._head_too_large = False

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        # Still in the head after a read: refused once past the limit, before a byte more is kept.
        if self._in_head and self._head_bytes > self.max_head_bytes and not self.transport.is_closing():
            self._head_too_large = True
            self.send_400_response("")

    def on_headers_complete(self) -> None:
        self._in_head = False
        # The reads' sizes count a body's first bytes too: only past the limit is the head itself measured.
        if self._head_bytes > self.max_head_bytes and self._head_size() > self.max_head_bytes:
            self._head_too_large = True
            raise _HeadTooLarge
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True
        self._head_bytes = 0

    def send_400_response(self, msg: str) -> None:
        """What uvicorn answers to what is not HTTP/1.1 (its text/plain 400), and the head refused, as OpenAI
        errors; the connection is closed after either."""
        error: SidecarError
        if self._head_too_large:
            limit = self.max_head_bytes
            error = RequestHeadersTooLarge(f"request line and headers larger than {limit} bytes")
            log.warning("request_head_too_large", limit_bytes=limit)
        else:
            error = BadRequest("invalid HTTP/1.1 request", code="invalid_http")
        body = json.dumps(error.body()).encode()
        content = [b"HTTP/1.1 %d %s\r\n" % (error.status_code, HTTPStatus(error.status_code).phrase.encode())]
        for name, value in self.server_state.default_headers:
            content += [name, b": ", value, b"\r\n"]
        content.append(b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body))
        content.append(b"connection: close\r\n\r\n" + body)
        self.transport.write(b"".join(content))
        self.transport.close()

    def _head_size(self) -> int:
        return len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)


def protocol(max_head_bytes: int) -> type[HttpProtocol]:
    """The protocol class for uvicorn's `http` setting, with this bound on a request's head."""
    return type("HttpProtocol", (HttpProtocol,), {"max_head_bytes": max_head_bytes})
