"""compose/: the files validate and lint, and the command each image runs works, run outside a container.

No Docker engine runs here. The compose files are checked against the Compose specification's JSON schema
(vendored by check-jsonschema) and the Dockerfiles with hadolint. Each image's ENTRYPOINT runs on the host with
the image's ENV and the pair's env file; the engine's CLI (`vllm`, `python3 -m sglang.launch_server`,
`text-generation-launcher`) is a shim on PATH that records the command the sidecar built and runs the mock
engine in its place. The orchestrator image's command then loads the model and chats, as it would in the pair.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from dockerfile_parse import DockerfileParser

from bench.processes import wait_ok
from sidecar.control.supervisor import shutdown_bound_s
from sidecar.settings import Settings, load_settings
from tests.processes import free_port, group_members

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "compose"
BIN = Path(sys.executable).parent
COMPOSE_FILES = sorted(COMPOSE.glob("docker-compose*.yml"))
DOCKERFILES = sorted(COMPOSE.glob("*.Dockerfile"))
IMAGES = {"vllm": "vllm", "sglang": "sglang", "tgi": "tgi", "cpu": "mock"}  # Dockerfile → engine it runs
API_KEY = "compose-api-key-0123"
ADMIN_KEY = "compose-admin-key-4567"


def _compose(path: Path) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(path.read_text())
    return document


def _image(name: str) -> DockerfileParser:
    return DockerfileParser(path=str(COMPOSE / f"{name}.Dockerfile"))


def _instruction(dockerfile: DockerfileParser, name: str) -> list[str]:
    values = [i["value"] for i in dockerfile.structure if i["instruction"] == name]
    command: list[str] = json.loads(values[-1])
    return command


def _env_file(path: Path) -> dict[str, str]:
    """compose/.env.example as an operator fills it in: the keys set, everything else as written."""
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name] = value
    return values | {"SIDECAR_API_KEYS": API_KEY, "SIDECAR_ADMIN_KEYS": ADMIN_KEY}


# -- the files ------------------------------------------------------------------------------------------------


def test_there_are_the_gpu_and_cpu_pairs_and_an_image_per_engine() -> None:
    assert [p.name for p in COMPOSE_FILES] == ["docker-compose.cpu.yml", "docker-compose.yml"]
    assert {p.name.removesuffix(".Dockerfile") for p in DOCKERFILES} == {*IMAGES, "orchestrator"}


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_file_validates_against_the_compose_specification(path: Path) -> None:
    checked = subprocess.run(
        [BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", path], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_schema_check_catches_a_mistyped_key(tmp_path: Path) -> None:
    broken = tmp_path / "docker-compose.yml"
    broken.write_text((COMPOSE / "docker-compose.yml").read_text().replace("healthcheck:", "healthchek:"))
    checked = subprocess.run(
        [BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", broken], capture_output=True, text=True
    )
    assert checked.returncode != 0 and "healthchek" in checked.stdout


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(path: Path) -> None:
    linted = subprocess.run([BIN / "hadolint", "--failure-threshold", "info", path], capture_output=True, text=True)
    assert linted.returncode == 0, linted.stdout + linted.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_base_images_are_pinned_and_each_a_build_argument(path: Path) -> None:
    """Every FROM defaults to a pinned official image and takes another (a mirror, a local base) by --build-arg."""
    defaults = DockerfileParser(path=str(path)).parent_images
    for image in defaults:
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest" and any(c.isdigit() for c in tag), image
    local = {"BASE_IMAGE": "local/base:1", "UV_IMAGE": "local/uv:1"}
    rebased = DockerfileParser(path=str(path), build_args=local).parent_images
    assert len(rebased) == len(defaults) and set(rebased) <= set(local.values()), rebased
    assert "COPY --from=" not in path.read_text().replace("COPY --from=build ", "").replace("COPY --from=uv ", "")


def test_cpu_image_builds_llama_cpp_as_ci_does_and_runs_without_the_compiler() -> None:
    dockerfile = (COMPOSE / "cpu.Dockerfile").read_text()
    ci_cmake_args = re.search(r'CMAKE_ARGS:-([^}"]+)', (REPO / ".ci" / "run").read_text())
    assert ci_cmake_args and f'ARG CMAKE_ARGS="{ci_cmake_args[1]}"' in dockerfile
    build, run = dockerfile.split("FROM ${BASE_IMAGE} AS build")[1].split("\nFROM ${BASE_IMAGE}\n")
    assert "build-essential" in build and "build-essential" not in run and "cmake" not in run
    assert "COPY --from=build /opt/sidecar /opt/sidecar" in run


def test_build_context_holds_only_what_the_images_copy() -> None:
    ignored = (REPO / ".dockerignore").read_text().splitlines()
    kept = {line[1:].rstrip("/") for line in ignored if line.startswith("!")}
    assert ignored[[i for i, line in enumerate(ignored) if not line.startswith("#")][0]] == "*"
    copied = set()
    for path in DOCKERFILES:
        for instruction in DockerfileParser(path=str(path)).structure:
            if instruction["instruction"] == "COPY" and not instruction["value"].startswith("--from="):
                copied |= set(instruction["value"].split()[:-1])
    assert copied == kept, (copied, kept)


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_pair_model_checked_on_ready_configured_from_the_env_file_orchestrator_beside_it(path: Path) -> None:
    services = _compose(path)["services"]
    assert set(services) == {"model", "orchestrator"}
    model, orchestrator = services["model"], services["orchestrator"]
    assert "/ready" in " ".join(model["healthcheck"]["test"])
    assert model["init"] is True
    assert model["env_file"] == orchestrator["env_file"] == "${ENV_FILE:-.env}"
    assert orchestrator["environment"]["SIDECAR_URL"] == "http://model:8000"
    assert "model" in orchestrator["depends_on"]
    assert model["ports"] == ["${HOST_PORT:-8000}:8000"]


def test_gpu_pair_reserves_gpus_for_the_model_only() -> None:
    services = _compose(COMPOSE / "docker-compose.yml")["services"]
    devices = services["model"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "${GPU_COUNT:-all}", "capabilities": ["gpu"]}]
    assert "deploy" not in services["orchestrator"]
    assert "deploy" not in _compose(COMPOSE / "docker-compose.cpu.yml")["services"]["model"]


def test_env_example_names_only_real_settings() -> None:
    text = (COMPOSE / ".env.example").read_text()
    named = {line.lstrip("# ").split("=")[0] for line in text.splitlines() if line.lstrip("# ").startswith("SIDECAR_")}
    fields = {f"SIDECAR_{name.upper()}" for name in Settings.model_fields}
    assert named and named <= fields, named - fields


# -- the command each image runs ------------------------------------------------------------------------------


@pytest.fixture
def shim_path(tmp_path: Path) -> Path:
    """A folder to put first on PATH, where each engine's CLI is the shim."""
    folder = tmp_path / "bin"
    folder.mkdir()
    shim = Path(__file__).with_name("engine_shim.py")
    for command, engine in (("vllm", "vllm"), ("python3", "sglang"), ("text-generation-launcher", "tgi")):
        script = folder / command
        script.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{shim}" {engine} "$@"\n')
        script.chmod(0o755)
    return folder


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_image_command_serves_the_pair_outside_a_container(image: str, tmp_path: Path, shim_path: Path) -> None:
    engine = IMAGES[image]
    dockerfile = _image(image)
    command = _instruction(dockerfile, "ENTRYPOINT") + _instruction(dockerfile, "CMD")
    assert command[0] == "/opt/sidecar/bin/sidecar"
    command[0] = str(BIN / "sidecar")  # where this checkout installed the same entry point
    env_file = _env_file(COMPOSE / ".env.example")
    port = free_port()
    model_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")},
        **dockerfile.envs,
        **env_file,
        # The compose file's environment for the model service, on loopback and a free port here.
        **{k: str(v) for k, v in _compose(COMPOSE / "docker-compose.yml")["services"]["model"]["environment"].items()},
        "SIDECAR_HOST": "127.0.0.1",
        "SIDECAR_PORT": str(port),
        "PATH": f"{shim_path}{os.pathsep}{os.environ['PATH']}",
        "SHIM_LOG": str(tmp_path / "shim.log"),
    }
    output = (tmp_path / "model.out").open("wb")
    sidecar = subprocess.Popen(command, env=model_env, cwd=tmp_path, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ok(f"{url}/health", timeout_s=20)

        orchestrator_command = _instruction(_image("orchestrator"), "ENTRYPOINT")
        assert orchestrator_command == ["python3", "/opt/orchestrator.py"]
        orchestrator_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")},
            **env_file,
            "SIDECAR_URL": url,
            "ENGINE": engine,
            "MODEL": "org/tiny-model" if engine != "mock" else "mock-model",
            "MODEL_ARGS": '{"max-model-len": 512}' if engine != "mock" else "{}",
        }
        orchestrated = _orchestrate(orchestrator_env)
        assert "model_loaded" in orchestrated and "chat_answered" in orchestrated and "ttft_ms" in orchestrated

        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        status = httpx.get(f"{url}/v1/model", headers=admin).json()
        assert (status["state"], status["engine"]) == ("ready", engine)
        if engine != "mock":
            (ran,) = [json.loads(line) for line in (tmp_path / "shim.log").read_text().splitlines()]
            expected = {
                "vllm": ["serve", "org/tiny-model", "--host", "127.0.0.1"],
                "sglang": ["-m", "sglang.launch_server", "--model-path", "org/tiny-model", "--host", "127.0.0.1"],
                "tgi": ["--model-id", "org/tiny-model", "--hostname", "127.0.0.1"],
            }[engine]
            assert ran["argv"][: len(expected)] == expected
            assert ran["argv"][ran["argv"].index("--max-model-len") + 1] == "512"
            assert ran["key_given"]  # where the engine takes it: the mock it ran answered the sidecar alone
        # A second run of the orchestrator finds the model loaded and only chats.
        assert "model_already_loaded" in _orchestrate(orchestrator_env)

        # `docker stop` sends SIGTERM: the sidecar stops the engine first, and nothing is left running.
        sidecar.send_signal(signal.SIGTERM)
        sidecar.wait(timeout=30)
        assert group_members(status["pid"]) == []
    finally:
        if sidecar.poll() is None:
            sidecar.kill()
            sidecar.wait()
        output.close()


def _orchestrate(env: dict[str, str]) -> str:
    """The orchestrator image's command, run here; what it logged, once it exited 0."""
    run = subprocess.run(
        [sys.executable, COMPOSE / "orchestrator.py"], env=env, capture_output=True, text=True, timeout=90
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


def _seconds(duration: str) -> float:
    """A compose duration (`70s`, `1m30s`, `2m`) in seconds."""
    parts = re.fullmatch(r"(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?", duration)
    assert parts and duration, f"unreadable duration {duration!r}"
    return int(parts[1] or 0) * 60 + float(parts[2] or 0)


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_stop_grace_period_covers_the_drain_and_the_engines_stop(path: Path) -> None:
    model = _compose(path)["services"]["model"]
    image = "cpu" if "cpu" in path.name else "vllm"
    env = {**_image(image).envs, **_env_file(COMPOSE / ".env.example"), **model["environment"]}
    sidecar = {k.removeprefix("SIDECAR_").lower(): v for k, v in env.items() if k.startswith("SIDECAR_")}
    settings = load_settings(None, **sidecar)
    assert _seconds(model["stop_grace_period"]) >= shutdown_bound_s(settings)
