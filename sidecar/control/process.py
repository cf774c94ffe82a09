"""One engine process: spawned in a process group of its own, its output read into the log, its whole group stopped.

Mechanism only; when to start, stop or restart it is the supervisor's business.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import itertools
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence

import psutil

from sidecar.control.guard import PR_SET_CHILD_SUBREAPER, die_with_parent, prctl
from sidecar.control.runfile import EngineRecord
from sidecar.logs import LineBudget, get_logger
from sidecar.redaction import Redactor

log = get_logger("sidecar.engine")

TAIL_LINES = 100
FOLLOW_BUFFER = 1000  # lines a live reader of the output may fall behind before it misses some
REAP_AFTER_KILL_S = 10.0  # how long the group may take to be gone after SIGKILL
_MAX_LINE = 16 * 1024  # a line longer than this is logged in pieces
_UNLOGGED_EVERY_S = 5.0  # while the engine's output is past its rate, how often the lines not logged are counted


def executable_on_own_path(executable: str) -> str:
    """The engine's executable as the sidecar's own PATH finds it (a path is taken as it is). A bare name given to
    the spawn would be looked up on the child's PATH, which a load request's `env` sets: the request chooses the
    engine's environment, never which program the sidecar starts."""
    found = shutil.which(executable)
    if found is None:
        raise FileNotFoundError(errno.ENOENT, f"{executable!r} is not an executable on the sidecar's PATH")
    return os.path.abspath(found)


def become_subreaper() -> None:
    """Orphaned engine descendants (workers whose parent died) become our children, so we can reap them."""
    try:
        prctl(PR_SET_CHILD_SUBREAPER, 1)
    except (OSError, AttributeError):
        log.warning("subreaper_unavailable")


def process_tree(pid: int) -> set[int]:
    """A process and its descendants (vLLM's workers hold the GPU memory, not its API server)."""
    try:
        return {pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))}
    except psutil.Error:
        return {pid}


class OutputFollower:
    """One reader of the engine's output as it comes (`GET /v1/model/logs`): its lines, masked, then None when
    the output ends (the process and its pipes are gone) or the reader is let go. Bounded: a reader that falls
    FOLLOW_BUFFER lines behind misses the next ones, counted in `dropped`, and never holds the engine up."""

    def __init__(self) -> None:
        self.lines: asyncio.Queue[tuple[str, str] | None] = asyncio.Queue()
        self.dropped = 0

    def push(self, stream: str, line: str) -> None:
        if self.lines.qsize() >= FOLLOW_BUFFER:
            self.dropped += 1
        else:
            self.lines.put_nowait((stream, line))

    def close(self) -> None:
        self.lines.put_nowait(None)


class _OutputProtocol(asyncio.SubprocessProtocol):
    """Splits stdout and stderr on `\\n` and `\\r` (progress bars) as the bytes arrive, never waiting for a line;
    the lines of each read go on together (`on_lines`), so that a flood is handled a read at a time."""

    def __init__(self, on_lines: Callable[[str, list[bytes]], None], on_end: Callable[[], None]) -> None:
        self.on_lines = on_lines
        self.on_end = on_end
        self.partial = {1: b"", 2: b""}
        self.exited = asyncio.Event()
        self.ended = False

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        buffer = self.partial.get(fd, b"") + data
        lines = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        self.partial[fd] = lines.pop()
        while len(self.partial[fd]) > _MAX_LINE:
            lines.append(self.partial[fd][:_MAX_LINE])
            self.partial[fd] = self.partial[fd][_MAX_LINE:]
        if lines := [line for line in lines if line.strip()]:
            self.on_lines("stdout" if fd == 1 else "stderr", lines)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        rest = self.partial.pop(fd, b"")
        if rest.strip():
            self.on_lines("stdout" if fd == 1 else "stderr", [rest])

    def process_exited(self) -> None:
        self.exited.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended = True  # the process exited and every pipe is closed: no more output
        self.on_end()


class _LoggedOutput:
    """How many of the engine's lines go into the log: at most `per_s` a second (`LineBudget`). Those past it are
    counted in an `engine_output_unlogged` warning: the first at once, then at most one every 5 s for as long as
    they go on, the last 5 s after them (or when the output ends), so that every line not logged is counted."""

    def __init__(self, name: str, per_s: float) -> None:
        self.name, self.per_s = name, per_s
        self.budget = LineBudget(per_s)
        self.unlogged = 0
        self.reported_at = -_UNLOGGED_EVERY_S
        self.due: asyncio.TimerHandle | None = None

    def take(self, lines: int) -> int:
        """How many of the next `lines` to log (the first ones); the rest are counted."""
        logging = self.budget.take(lines)
        if logging < lines:
            self.unlogged += lines - logging
            if self.due is None:
                wait = self.reported_at + _UNLOGGED_EVERY_S - time.monotonic()
                if wait <= 0:
                    self.report()
                else:
                    self.due = asyncio.get_running_loop().call_later(wait, self.report)
        return logging

    def report(self) -> None:
        """The lines not logged since the last report, reported (where there are any)."""
        if self.due is not None:
            self.due.cancel()
            self.due = None
        if self.unlogged:
            log.warning("engine_output_unlogged", engine=self.name, lines=self.unlogged, lines_per_s=self.per_s)
            self.unlogged = 0
            self.reported_at = time.monotonic()


def _in_own_group() -> None:
    """In the child before it runs the engine: a process group of its own, and SIGTERM when the sidecar goes."""
    os.setpgid(0, 0)
    die_with_parent()


class EngineProcess:
    def __init__(
        self,
        name: str,
        transport: asyncio.SubprocessTransport,
        protocol: _OutputProtocol,
        tail: collections.deque[tuple[str, str]],
        followers: set[OutputFollower],
        guard: asyncio.subprocess.Process,
        record: EngineRecord,
    ) -> None:
        self.name = name
        self._followers = followers
        self._guard = guard
        self._record = record
        self._transport = transport
        self._protocol = protocol
        self._tail = tail
        self.pid: int = transport.get_pid()
        self.started_at = time.time()
        self._stopping: asyncio.Task[int | None] | None = None

    @classmethod
    async def spawn(
        cls,
        name: str,
        argv: list[str],
        env: dict[str, str],
        redactor: Redactor,
        record: EngineRecord,
        grace_s: float,
        port: int,
        output_lines_per_s: float = 0,
        masked: Sequence[str] = (),
    ) -> EngineProcess:
        """Start argv (never through a shell) in a new process group; `env` is the child's whole environment.

        A group of its own, for one signal to reach all of it; but the sidecar's session, not a new one: Linux's
        autogroup scheduling (on where tasks are not in a CPU cgroup of their own: a host's shell, CI) puts each
        session in a scheduling group, and with a CPU engine busy on every core (vLLM's CPU build) the kernel left
        the sidecar runnable but unrun for 1-30 s at a time, every stream stalled meanwhile. In one session, the
        engine's threads and the sidecar's share the cores as threads do (docs/control-plane.md).

        The engine dies with the sidecar: its leader gets SIGTERM from the kernel when the sidecar dies, and a
        guard process stops the rest of its group (`sidecar.guard`); its pid goes into the run directory's record.

        Its output is logged at most `output_lines_per_s` lines a second (0: every line); every line is kept in
        the tail and goes to followers whatever the rate, and what was not logged is counted in a warning. The
        `masked` values, registered with the redactor for this engine, are forgotten once its output has ended:
        nothing it writes after can hold them.
        """
        tail: collections.deque[tuple[str, str]] = collections.deque(maxlen=TAIL_LINES)
        followers: set[OutputFollower] = set()

        logged = _LoggedOutput(name, output_lines_per_s)

        def on_lines(stream: str, lines: list[bytes]) -> None:
            # The first `to_log` are logged; with no follower, those past them that the read's own last
            # TAIL_LINES push out of the tail are only counted: a flood costs a split, not a mask, per line.
            to_log = logged.take(len(lines))
            kept_from = to_log if followers else max(to_log, len(lines) - TAIL_LINES)
            for index in itertools.chain(range(to_log), range(kept_from, len(lines))):
                line = redactor.redact_text(lines[index].decode(errors="replace"))
                tail.append((stream, line))
                if index < to_log:
                    log.info("engine_output", engine=name, stream=stream, line=line)
                for follower in followers:
                    follower.push(stream, line)

        forgotten = False

        def forget_masked() -> None:  # once: an output's end after a failed start must not undo another's hold
            nonlocal forgotten
            if not forgotten:
                forgotten = True
                redactor.forget(*masked)

        def on_end() -> None:
            logged.report()
            _let_go(followers)
            forget_masked()

        loop = asyncio.get_running_loop()
        try:
            transport, protocol = await loop.subprocess_exec(
                lambda: _OutputProtocol(on_lines, on_end),
                executable_on_own_path(argv[0]),
                *argv[1:],
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                preexec_fn=_in_own_group,  # uvloop's spawn takes no `process_group`
            )
        except BaseException:
            forget_masked()  # nothing started: no output to mask
            raise
        pid = transport.get_pid()
        guard_argv = [sys.executable, "-m", "sidecar.control.guard", str(os.getpid()), str(pid), str(grace_s)]
        try:
            guard = await asyncio.create_subprocess_exec(
                *guard_argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                start_new_session=True,  # a signal to the sidecar's group must not reach it
            )
        except BaseException:  # an engine nothing would stop if the sidecar died: not left running
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            transport.close()
            raise
        record.write(pid, name, port)
        return cls(name, transport, protocol, tail, followers, guard, record)

    @property
    def returncode(self) -> int | None:
        return self._transport.get_returncode()

    @property
    def exited(self) -> asyncio.Event:
        return self._protocol.exited

    def tail(self, lines: int = TAIL_LINES) -> list[str]:
        return [line for _, line in list(self._tail)[-lines:]] if lines else []

    @contextlib.contextmanager
    def follow(self, tail: int = TAIL_LINES) -> Iterator[tuple[list[tuple[str, str]], OutputFollower]]:
        """The last `tail` lines kept, (stream, line), and a follower of the lines after them: none missed or
        repeated between the two. A follower of an engine whose output has ended is closed at once."""
        follower = OutputFollower()
        if self._protocol.ended:
            follower.close()
        else:
            self._followers.add(follower)
        try:
            yield (list(self._tail)[-tail:] if tail else []), follower
        finally:
            self._followers.discard(follower)

    @property
    def followers(self) -> int:
        return len(self._followers)

    def let_followers_go(self) -> None:
        """The sidecar is stopping: live readers end now, so that the server's drain does not wait for them."""
        _let_go(self._followers)

    def members(self) -> list[psutil.Process]:
        """Every live process of the engine: its process group and its descendants (which may have left it)."""
        found: dict[int, psutil.Process] = {}
        try:
            leader = psutil.Process(self.pid)
            for child in leader.children(recursive=True):
                found[child.pid] = child
            found[leader.pid] = leader
        except psutil.NoSuchProcess:
            pass
        for proc in psutil.process_iter():
            try:
                if os.getpgid(proc.pid) == self.pid:
                    found[proc.pid] = proc
            except (ProcessLookupError, psutil.NoSuchProcess):
                continue
        return [p for p in found.values() if _alive(p)]

    async def stop(self, grace_s: float) -> int | None:
        """SIGTERM to the group, SIGKILL after grace_s, every member reaped. Idempotent; not cancellable."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop(grace_s))
        return await asyncio.shield(self._stopping)

    async def _stop(self, grace_s: float) -> int | None:
        members = self.members()
        self._signal(members, signal.SIGTERM)
        gone = await self._wait_gone(members, grace_s)
        if not gone:
            log.warning("engine_kill", engine=self.name, pid=self.pid, grace_s=grace_s)
            members = self.members() or members
            self._signal(members, signal.SIGKILL)
            await self._wait_gone(members, REAP_AFTER_KILL_S)
        await self.exited.wait()
        self._transport.close()
        with contextlib.suppress(ProcessLookupError):
            self._guard.kill()
        await self._guard.wait()
        self._record.clear()
        return self.returncode

    def _signal(self, members: list[psutil.Process], sig: signal.Signals) -> None:
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass
        for proc in members:  # descendants that left the group
            try:
                proc.send_signal(sig)
            except psutil.NoSuchProcess:
                pass

    async def _wait_gone(self, members: list[psutil.Process], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while True:
            _reap([p for p in members if p.pid != self.pid])  # the leader is reaped by asyncio
            if not any(_alive(p) for p in members) and self.exited.is_set():
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)


def _let_go(followers: set[OutputFollower]) -> None:
    for follower in followers:
        follower.close()
    followers.clear()


def _alive(proc: psutil.Process) -> bool:
    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _reap(members: list[psutil.Process]) -> None:
    """Collect the exit status of members that became our children (we are their subreaper)."""
    for proc in members:
        try:
            os.waitpid(proc.pid, os.WNOHANG)
        except ChildProcessError:
            pass
