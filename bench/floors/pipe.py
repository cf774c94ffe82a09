"""The floor of a Python relay on uvloop: bytes piped both ways, one engine connection per client connection, no
HTTP parsed. `python pipe.py PORT ENGINE_PORT`, then `python -m bench --target http://127.0.0.1:PORT --target-pid
PID --engine-port ENGINE_PORT`."""

import asyncio
import sys

import uvloop


class _Engine(asyncio.Protocol):
    def __init__(self, client: "_Client") -> None:
        self.client = client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.client.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.transport.close()


class _Client(asyncio.Protocol):
    def __init__(self, engine_port: int) -> None:
        self.engine_port = engine_port
        self.engine: _Engine | None = None
        self.pending: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.connecting = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        _, engine = await loop.create_connection(lambda: _Engine(self), "127.0.0.1", self.engine_port)
        for data in self.pending:
            engine.transport.write(data)
        self.engine = engine

    def data_received(self, data: bytes) -> None:
        if self.engine is None:
            self.pending.append(data)
        else:
            self.engine.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.engine is not None:
            self.engine.transport.close()


async def _serve(port: int, engine_port: int) -> None:
    server = await asyncio.get_running_loop().create_server(lambda: _Client(engine_port), "127.0.0.1", port)
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(_serve(int(sys.argv[1]), int(sys.argv[2])))
