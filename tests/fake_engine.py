"""A fake engine speaking raw HTTP/1.1 in a thread of the test, for what the mock engine cannot be made to do:
close connections its own way, or write a whole answer at once. Each handler answers one chat request;
`/health`, `/v1/models` and every GET get a model list, as the readiness probes need."""

from __future__ import annotations

import socketserver
import threading
from collections.abc import Iterator
from contextlib import contextmanager

MODELS = b'{"object": "list", "data": [{"id": "fake", "object": "model"}]}'


class FakeEngine(socketserver.StreamRequestHandler):
    extra_headers = b""  # added to every answer's head

    def handle(self) -> None:
        while request_line := self.rfile.readline():
            length = 0
            while (line := self.rfile.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                length = int(value) if name.strip().lower() == "content-length" else length
            self.body = self.rfile.read(length)
            method, path, _ = request_line.decode("latin-1").split(" ", 2)
            if not (self.chat() if method == "POST" else self.get(path)):
                return

    def get(self, path: str) -> bool:
        """Answer a GET (a probe, or a scrape of the engine's /metrics); False closes the connection."""
        self.send(b"application/json", MODELS)
        return True

    def chat(self) -> bool:
        """Answer a chat request; False closes the connection."""
        raise NotImplementedError

    def send(self, content_type: bytes, body: bytes) -> None:
        head = b"HTTP/1.1 200 OK\r\nContent-Type: " + content_type + b"\r\n" + self.extra_headers
        self.wfile.write(head + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


@contextmanager
def serving(handler: type[FakeEngine]) -> Iterator[str]:
    """The fake engine on a free loopback port, for the test's duration: its URL."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
