"""One engine process: spawned in a process group of its own, its output read (`engine_output.py`), its whole group
stopped.

Mechanism only; when to start, stop or restart it is the supervisor's business.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import signal
import sys
import time
from collections.abc import Sequence

import psutil

from sidecar.control.engine_output import EngineOutput
from sidecar.control.guard import PR_SET_CHILD_SUBREAPER, die_with_parent, prctl
from sidecar.control.runfile import EngineRecord
from sidecar.logs import get_logger
from sidecar.redaction import Redactor

log = get_logger("sidecar.engine")

REAP_AFTER_KILL_S = 10.0  # how long the group may take to be gone after SIGKILL


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


class _Protocol(asyncio.SubprocessProtocol):
    """The engine process's pipes into its output, and its exit."""

    def __init__(self, output: EngineOutput) -> None:
        self.output = output
        self.exited = asyncio.Event()

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        self.output.feed(fd, data)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        self.output.pipe_closed(fd)

    def process_exited(self) -> None:
        self.exited.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.output.end()


def _in_own_group() -> None:
    """In the child before it runs the engine: a process group of its own, and SIGTERM when the sidecar goes."""
    os.setpgid(0, 0)
    die_with_parent()


class EngineProcess:
    def __init__(
        self,
        name: str,
        transport: asyncio.SubprocessTransport,
        protocol: _Protocol,
        guard: asyncio.subprocess.Process,
        record: EngineRecord,
    ) -> None:
        self.name = name
        self.output = protocol.output
        self._guard = guard
        self._record = record
        self._transport = transport
        self._protocol = protocol
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

        Its output is `output` (`EngineOutput`): logged at most `output_lines_per_s` lines a second, kept, read
        by followers; the `masked` values are forgotten once it has ended.
        """
        output = EngineOutput(name, redactor, output_lines_per_s, masked)
        loop = asyncio.get_running_loop()
        try:
            transport, protocol = await loop.subprocess_exec(
                lambda: _Protocol(output),
                executable_on_own_path(argv[0]),
                *argv[1:],
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                preexec_fn=_in_own_group,  # uvloop's spawn takes no `process_group`
            )
        except BaseException:
            output.forget_masked()  # nothing started: no output to mask
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
        return cls(name, transport, protocol, guard, record)

    @property
    def returncode(self) -> int | None:
        return self._transport.get_returncode()

    @property
    def exited(self) -> asyncio.Event:
        return self._protocol.exited

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
