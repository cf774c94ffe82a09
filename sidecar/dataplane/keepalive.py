"""The engine client's idle keep-alive connections, by origin: the most recently used taken first, each closed
`keepalive_s` after its last use.

They are closed on a timer, not only when a request next looks for one, so a quiet sidecar holds no connection to
the engine: an engine closes its side of an idle one on its own timer (uvicorn after 5 s), which a busy engine's
loop runs late. The timer is set only while a connection is idle, for the oldest one."""

from __future__ import annotations

import asyncio
import time
from typing import Generic, Protocol, TypeVar


class Reusable(Protocol):
    closed: bool  # the engine (or the sidecar) has closed it
    idle_since: float  # time.monotonic() of its last use

    def abort(self) -> None: ...


Key = TypeVar("Key")
Connection = TypeVar("Connection", bound=Reusable)


class KeepAlive(Generic[Key, Connection]):
    def __init__(self, keepalive_s: float) -> None:
        self.keepalive_s = keepalive_s
        self._idle: dict[Key, list[Connection]] = {}  # each key's in the order they went idle
        self._expiry: asyncio.TimerHandle | None = None

    def put(self, key: Key, connection: Connection) -> None:
        # The monotonic clock, not the loop's time: asyncio's get_running_loop() is a getpid() system call, and
        # take() runs on every request's way to the engine. The timer's delays are the same on either clock.
        connection.idle_since = time.monotonic()
        self._idle.setdefault(key, []).append(connection)
        if self._expiry is None:
            self._expiry = asyncio.get_running_loop().call_later(self.keepalive_s, self._close_expired)

    def take(self, key: Key) -> Connection | None:
        """The most recently used connection that is still open and not past `keepalive_s`, or None."""
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if self._usable(connection, now):
                return connection
            connection.abort()
        return None

    def forget(self, key: Key, connection: Connection) -> None:
        """An idle connection the engine closed."""
        idle = self._idle.get(key)
        if idle and connection in idle:
            idle.remove(connection)

    def close(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        for idle in self._idle.values():
            for connection in idle:
                connection.abort()
        self._idle.clear()

    def __len__(self) -> int:
        return sum(len(idle) for idle in self._idle.values())

    def _usable(self, connection: Connection, now: float) -> bool:
        return not connection.closed and now - connection.idle_since < self.keepalive_s

    def _close_expired(self) -> None:
        """The timer: the connections past `keepalive_s` closed; set again for the oldest left, if any. A key with
        none left is dropped: each engine start is a new origin (a new port), and an old one's list would be kept and
        walked here for good."""
        self._expiry = None
        now = time.monotonic()
        oldest: float | None = None
        for key, idle in list(self._idle.items()):
            expired = 0
            while expired < len(idle) and not self._usable(idle[expired], now):
                idle[expired].abort()
                expired += 1
            del idle[:expired]
            if not idle:
                del self._idle[key]
            elif oldest is None or idle[0].idle_since < oldest:
                oldest = idle[0].idle_since
        if oldest is not None:
            self._expiry = asyncio.get_running_loop().call_later(oldest + self.keepalive_s - now, self._close_expired)
