"""The benchmark runs from a clean clone: one command, a table, a JSON file and a chart."""

from __future__ import annotations

import asyncio
import copy
import io
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from bench import guard, peers
from bench.fast_engine import ENGINE_TTFT_FIELD
from bench.loadgen import LoadProcesses, PhaseResult, chat_body
from bench.nginx import find_nginx
from bench.processes import ProcessMeter, wait_ok
from bench.report import summarize, write_table
from sidecar.control.engine import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
NGINX = find_nginx("auto")
NO_NGINX = "nginx is not installed (`.ci/run` installs nginx-light): the bench ran without its reference proxy"


def _bench(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """`python -m bench` with these arguments, run to its end: it must succeed."""
    result = subprocess.run(
        [sys.executable, "-m", "bench", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def test_bench_measures_the_sidecar_against_direct_and_nginx(tmp_path: Path) -> None:
    """The default run: the fast engine, every level, the cost split and the memory checks; nginx where installed."""
    out = tmp_path / "results"
    result = _bench("--concurrency", "1,16", "--seconds", "0.5", "--rounds", "1", "--out", str(out), timeout=180)
    assert "chunks/s ratio" in result.stdout and "engine check at 16 streams" in result.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["engine"] == "fast"
    assert [level["concurrency"] for level in results["levels"]] == [1, 16]
    for level in results["levels"]:
        assert level["errors"] == 0 and level["direct_errors"] == 0, level["first_error"]
        assert level["throughput_ratio"] > 0 and level["proxy_cpu_s_per_1k_chunks"] > 0
        assert level["direct_chunks_per_s"] > 0 and level["core_share_at_direct_rate"] > 0
        assert level["added_ttft_engine_timed"]  # the engine said its own TTFT
        assert ("nginx" in level) == (NGINX is not None)
        if NGINX:
            assert level["nginx"]["errors"] == 0 and level["nginx"]["added_ttft_engine_timed"]
    assert "+TTFT of sidecar" in result.stdout and "the path's" in result.stdout
    assert results["machine"]["idle_penalty"] > 0  # measured: the run has one stream
    split = results["cost_split"]["sidecar"]
    assert [phase["tokens"] for phase in split["phases"]] == [32, 256]
    short, long = split["phases"]
    assert long["chunks"] / long["requests"] > 4 * short["chunks"] / short["requests"]  # the engine honoured them
    assert split["cpu_ms_per_request"] is not None and split["cpu_us_per_chunk"] is not None
    memory = results["memory"]
    assert memory["long_stream_4000_tokens"]["errors"] == 0, memory
    assert memory["long_stream_4000_tokens"]["chunks"] >= 4000
    assert memory["prompt_2mb_x10"]["errors"] == 0, memory
    assert (out / "results.png").read_bytes().startswith(b"\x89PNG")
    assert ("nginx" in results["cost_split"]) == (NGINX is not None)
    if NGINX is None:
        pytest.skip(NO_NGINX)  # after the rest was checked: the skip says what was not


def test_the_embeddings_bench_measures_each_proxy_against_direct(tmp_path: Path) -> None:
    """`python -m bench.embeddings`: whole answers of floats to requests of long passages, the sidecar and nginx
    beside direct, the engine's CPU a request checked against theirs."""
    out = tmp_path / "embeddings"
    argv = ["-m", "bench.embeddings", "--concurrency", "1,4", "--seconds", "0.5", "--rounds", "1", "--out", str(out)]
    argv += ["--input-chars", "2000"]
    result = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "CPU ms/request" in result.stdout and "the engine's CPU a request at 4" in result.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["answer_bytes"] > 1_000_000  # 64 embeddings of 1,024 floats
    assert results["request_bytes"] > 64 * 2000  # 64 passages of 2,000 characters
    for level in results["levels"]:
        assert level["direct"]["errors"] == 0 and level["direct"]["requests_per_s"] > 0
        sidecar = level["proxies"]["sidecar"]
        assert sidecar["errors"] == 0, sidecar["first_error"]
        assert sidecar["throughput_ratio"] > 0 and sidecar["cpu_ms_per_request"] > 0
        assert ("nginx" in level["proxies"]) == (NGINX is not None)
    if NGINX is None:
        pytest.skip(NO_NGINX)


def test_bench_in_front_of_the_mock_engine_loaded_by_the_sidecar(tmp_path: Path) -> None:
    out = tmp_path / "results"
    _bench(
        *("--engine", "mock", "--concurrency", "1,4", "--seconds", "0.5", "--rounds", "1", "--no-cost-split"),
        *("--skip-memory", "--history-bytes", "20000", "--out", str(out)),
        timeout=120,
    )
    results = json.loads((out / "results.json").read_text())
    assert results["engine"] == "mock" and results["memory"] is None and results["cost_split"] is None
    assert results["settings"]["history_bytes"] == 20000  # every request carried a 20 KB conversation
    for level in results["levels"]:
        assert level["added_ttft_engine_timed"] is False  # the mock does not say its TTFT: client TTFTs compared
        assert level["errors"] == 0 and level["direct_errors"] == 0, level["first_error"]
        assert level["throughput_ratio"] > 0 and level["proxy_cpu_s_per_1k_chunks"] > 0


def test_bench_compares_counts_of_workers(tmp_path: Path) -> None:
    """As on the 16-core machine: the load from two processes of its own, so that it is not what caps the workers."""
    out = tmp_path / "results"
    result = _bench(
        *("--workers", "1,2", "--concurrency", "1,8", "--seconds", "0.5", "--rounds", "1", "--no-cost-split"),
        *("--skip-memory", "--nginx", "off", "--load-processes", "2", "--out", str(out)),
        timeout=180,
    )
    assert "relayed chunks/s at 8 streams by SIDECAR_WORKERS" in result.stdout
    scaling = json.loads((out / "scaling.json").read_text())["scaling"]
    assert [row["workers"] for row in scaling] == [1, 2] and scaling[0]["vs_first"] == 1.0
    for row in scaling:
        assert row["errors"] == 0 and row["chunks_per_s"] > 0 and row["cpu_s_per_1k_chunks"] > 0
        assert row["direct_in_worker_cores"] > 0


def test_load_processes_share_out_the_streams_and_merge_what_they_measured() -> None:
    """Three streams from two processes: one result, every request in it with its TTFT, none lost."""
    port = free_port()
    argv = [sys.executable, "-m", "bench.fast_engine", "--port", str(port), "--ttft-ms", "30", "--itl-ms", "2"]
    engine = subprocess.Popen(argv, cwd=REPO)
    load = LoadProcesses(2)
    try:
        wait_ok(f"http://127.0.0.1:{port}/health")
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        result = asyncio.run(load.run_phase("direct", url, {}, chat_body(8), 3, 0.5))
    finally:
        load.close()
        engine.terminate()
        engine.wait(timeout=30)
    assert result.target == "direct" and result.concurrency == 3 and result.errors == 0, result.first_error
    assert result.seconds >= 0.5
    # A stream takes about 44 ms: in 0.5 s each of the three runs about 12, and a share lost would show.
    assert 3 * 8 <= result.requests <= 3 * 14
    assert len(result.ttfts_ms) == result.requests and min(result.ttfts_ms) >= 25  # the engine's 30, its 1 ms clock
    assert result.chunks >= result.requests * 8


def test_fast_engine_says_its_own_ttft() -> None:
    """The first token carries the engine's own TTFT, which the bench takes from the client's."""
    port = free_port()
    argv = [sys.executable, "-m", "bench.fast_engine", "--port", str(port), "--ttft-ms", "40"]
    engine = subprocess.Popen(argv, cwd=REPO)
    try:
        wait_ok(f"http://127.0.0.1:{port}/health")
        body = {"stream": True, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        started = time.perf_counter()
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as response:
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: {")]
            client_ttft_ms = (time.perf_counter() - started) * 1000
    finally:
        engine.terminate()
        engine.wait()
    role, first, *rest = (json.loads(event) for event in events)
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""} and ENGINE_TTFT_FIELD not in role
    engine_ttft_ms = first[ENGINE_TTFT_FIELD] / 1000
    # Its 1 ms clock counts from the last tick it ran, which may be a few behind on a busy machine.
    assert 35 <= engine_ttft_ms <= client_ttft_ms
    assert all(ENGINE_TTFT_FIELD not in event for event in rest)  # the other tokens are the shared, encoded one
    assert first["choices"] == rest[0]["choices"]


def test_the_cost_split_is_compared_with_the_reference_proxy() -> None:
    """Per request and per relayed chunk, the sidecar's CPU over nginx's, where both came out positive."""
    results = json.loads((REPO / "bench" / "reference" / "first-token" / "run2.json").read_text())
    sidecar, nginx = results["cost_split"]["sidecar"], results["cost_split"]["nginx"]
    per_request = round(sidecar["cpu_ms_per_request"] / nginx["cpu_ms_per_request"], 2)
    per_chunk = round(sidecar["cpu_us_per_chunk"] / nginx["cpu_us_per_chunk"], 2)
    out = io.StringIO()
    write_table(results, out)
    assert f"sidecar / nginx: {per_request}x per request, {per_chunk}x per relayed chunk" in out.getvalue()

    noisy = copy.deepcopy(results)
    noisy["cost_split"]["nginx"]["cpu_ms_per_request"] = -0.01  # two phases solved for two unknowns: it happens
    out = io.StringIO()
    write_table(noisy, out)
    assert f"sidecar / nginx: - per request, {per_chunk}x per relayed chunk" in out.getvalue()


def test_the_one_stream_verdict_says_the_machines_idle_penalty() -> None:
    results = json.loads((REPO / "bench" / "reference" / "first-token" / "run2.json").read_text())
    out = io.StringIO()
    write_table(results, out)
    assert "after 20 ms idle" not in out.getvalue()  # a run from before the figure was measured

    results["machine"]["idle_penalty"] = 2.13
    out = io.StringIO()
    write_table(results, out)
    one_stream, penalty = out.getvalue().split("  1 streams: ")[1].splitlines()[:2]
    assert "at most 0.3 at one stream" in one_stream
    assert penalty.strip().startswith("idle penalty 2.13: Python took 2.13x as long after 20 ms idle as kept busy")


def test_bench_puts_the_sidecar_with_opentelemetry_on_beside_it(tmp_path: Path) -> None:
    """`--otel`: a second sidecar in front of the same engine, exporting to the bench's OTLP sink, in the same run."""
    out = tmp_path / "results"
    args = ("--otel", "--concurrency", "1,16", "--seconds", "0.5", "--rounds", "1", "--nginx", "off", "--skip-memory")
    result = _bench(*args, "--out", str(out), timeout=240)
    results = json.loads((out / "results.json").read_text())
    assert results["compared"] == ["sidecar+otel"]
    for level in results["levels"]:
        traced = level["sidecar+otel"]
        assert traced["errors"] == 0 and traced["proxy_cpu_s_per_1k_chunks"] > 0, traced["first_error"]
    assert results["cost_split"]["sidecar+otel"]["cpu_ms_per_request"] is not None
    assert "sidecar+otel against sidecar" in result.stdout
    assert "sidecar+otel - sidecar:" in result.stdout


def test_the_cpu_meter_sees_the_few_milliseconds_of_a_short_phase() -> None:
    """At one stream a proxy spends a few ms of CPU in a phase: /proc's 10 ms ticks read them as 0 or 10, and a
    level read 0 CPU per chunk. The meter reads them as spent."""
    spin = (
        "import sys, time\n"
        "for line in sys.stdin:\n"
        "    start = time.process_time()\n"
        "    while time.process_time() - start < 0.003: pass\n"
        "    print('spun', flush=True)\n"
    )
    with subprocess.Popen([sys.executable, "-c", spin], stdin=subprocess.PIPE, stdout=subprocess.PIPE) as child:
        assert child.stdin is not None and child.stdout is not None
        stdin, stdout = child.stdin, child.stdout

        def spin_once() -> None:
            stdin.write(b"go\n")
            stdin.flush()
            assert stdout.readline() == b"spun\n"

        async def phase() -> float:
            with ProcessMeter(child.pid) as meter:
                await asyncio.to_thread(spin_once)
            return meter.cpu_s

        spin_once()  # past its start-up

        try:
            assert 0.003 <= asyncio.run(phase()) < 0.009
        finally:
            child.kill()


def test_a_proxy_that_drops_the_engines_ttft_is_compared_on_client_ttfts() -> None:
    """LiteLLM's proxy rebuilds the engine's chunks without the field where the fast engine says its own TTFT: its
    added TTFT is its client TTFT against the direct one, never against the direct path's (which is near zero)."""
    direct = PhaseResult("direct", 1, seconds=1, chunks=10, ttfts_ms=[20.0, 20.2], path_ttfts_ms=[0.1, 0.1])
    timed = PhaseResult("timed", 1, seconds=1, chunks=10, ttfts_ms=[20.5, 20.7], path_ttfts_ms=[0.6, 0.6])
    untimed = PhaseResult("untimed", 1, seconds=1, chunks=10, ttfts_ms=[26.0, 26.2])
    level = summarize(1, [direct], {"timed": ([timed], 1.0, 1.0), "untimed": ([untimed], 1.0, 1.0)}, "timed")
    assert level["added_ttft_engine_timed"] and level["added_ttft_p50_ms"] == 0.5
    assert not level["untimed"]["added_ttft_engine_timed"]
    assert level["untimed"]["added_ttft_p50_ms"] == 6.0


def test_a_peer_that_cannot_be_installed_is_skipped_saying_why(tmp_path: Path) -> None:
    nothing = peers.Peer(
        "nothing", "no-such-package-for-the-sidecar-bench==0.0.1", "nothing", lambda *a: [], {}, True, tmp_path
    )
    process, url, reason = peers.start(nothing, "http://127.0.0.1:9", "m", "k", None, tmp_path)
    assert process is None and url is None
    assert reason is not None and "no-such-package-for-the-sidecar-bench" in reason
    assert "No matching distribution" in (tmp_path / "nothing-install.log").read_text()


def test_an_unknown_peer_is_refused_naming_those_there_are() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--peers", "nginx-plus"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "no peer named nginx-plus" in result.stderr and "litellm, vllm-router" in result.stderr


def test_the_ci_guard_fails_a_relay_over_its_bound_or_one_that_measured_nothing() -> None:
    assert guard.judge(2.3, 4.0) == (True, "passed: 2.3x nginx's CPU per chunk, bound 4.0x")
    passed, line = guard.judge(4.6, 4.0)  # a change that doubled the relay's cost
    assert not passed and "4.6x nginx's, over the bound of 4.0x" in line
    assert guard.judge(None, 4.0)[0] is False


def test_the_guards_bound_clears_every_recorded_run_and_fails_a_doubled_relay() -> None:
    """The bound against the runs it was set from: room above the worst for noise (a red CI from noise stops every
    change), yet under twice each machine's median (a relay grown twice as dear must fail)."""
    recorded = [json.loads(path.read_text()) for path in sorted((REPO / "bench/reference/guard").glob("runs*.json"))]
    assert len(recorded) >= 2 and all(len(machine["runs"]) >= 10 for machine in recorded)
    for machine in recorded:
        ratios = [run["cpu_per_chunk_ratio"] for run in machine["runs"]]
        assert guard.BOUND >= 1.3 * max(ratios), (guard.BOUND, max(ratios))
        assert guard.BOUND < 2 * sorted(ratios)[len(ratios) // 2], (guard.BOUND, ratios)


@pytest.mark.skipif(
    shutil.which("callgrind_control") is None, reason="valgrind is not installed (`.ci/run` installs it)"
)
def test_instructions_counts_a_requests_path_for_the_sidecar_and_its_floors(tmp_path: Path) -> None:
    """`python -m bench.instructions`: each proxy's instructions per request, the sidecar's work on a request more
    than uvicorn's with nothing on it, and that more than a byte pipe's."""
    out = tmp_path / "instructions.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench.instructions", "--requests", "3", "--warm", "2", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    counts = json.loads(out.read_text())["per_request"]
    assert counts["sidecar"] > counts["bare_uvicorn"] > counts["pipe"] > 0
    assert "the sidecar: " in result.stdout and "x bare_uvicorn's" in result.stdout


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed (`.ci/run` installs it)")
def test_syscalls_counts_what_each_proxys_loop_asks_of_the_kernel_a_request(tmp_path: Path) -> None:
    """`python -m bench.syscalls`: each token a read and a write for every proxy, and the sidecar's loop asking the
    kernel little else: not a `getpid` a read, as when asyncio was asked for the running loop at every read."""
    out = tmp_path / "syscalls.json"
    argv = [sys.executable, "-m", "bench.syscalls", "--proxies", "sidecar,pipe", "--requests", "5", "--warm", "2"]
    result = subprocess.run([*argv, "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    recorded = json.loads(out.read_text())
    tokens, counts = recorded["tokens"], recorded["per_request"]
    for proxy in ("sidecar", "pipe"):  # a busy machine may bring two tokens in one read now and then
        assert counts[proxy]["read"] >= tokens / 2 and counts[proxy]["write"] >= tokens / 2, counts[proxy]
    assert counts["sidecar"].get("getpid", 0) < tokens / 4, counts["sidecar"]
    assert "sidecar: " in result.stdout and "pipe: " in result.stdout


@pytest.mark.skipif(
    shutil.which("callgrind_control") is None, reason="valgrind is not installed (`.ci/run` installs it)"
)
def test_instructions_count_a_connection_each_only_when_asked(tmp_path: Path) -> None:
    """By default the requests share one keep-alive connection, as SDK clients send them; `--new-connections`
    opens one a request, and the proxy's accepting it (and the pipe's connecting to the engine) is counted too."""
    counts = {}
    for mode in ("keep-alive", "new"):
        out = tmp_path / f"{mode}.json"
        argv = [sys.executable, "-m", "bench.instructions", "--proxies", "pipe", "--requests", "5", "--warm", "2"]
        argv += ["--out", str(out)] + (["--new-connections"] if mode == "new" else [])
        result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        recorded = json.loads(out.read_text())
        assert recorded["new_connections"] is (mode == "new")
        counts[mode] = recorded["per_request"]["pipe"]
    assert counts["new"] > 1.2 * counts["keep-alive"]
