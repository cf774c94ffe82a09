"""The benchmark runs from a clean clone: one command, a table, a JSON file and a chart."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _bench(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """`python -m bench` with these arguments, run to its end: it must succeed."""
    result = subprocess.run(
        [sys.executable, "-m", "bench", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def test_bench_measures_the_sidecar_against_direct(tmp_path: Path) -> None:
    """The default run: the fast engine, every level, the cost split and the memory checks."""
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
        assert level["errors"] == 0 and level["direct_errors"] == 0, level["first_error"]
        assert level["throughput_ratio"] > 0 and level["proxy_cpu_s_per_1k_chunks"] > 0


def test_bench_compares_counts_of_workers(tmp_path: Path) -> None:
    out = tmp_path / "results"
    result = _bench(
        *("--workers", "1,2", "--concurrency", "1,8", "--seconds", "0.5", "--rounds", "1", "--no-cost-split"),
        *("--skip-memory", "--nginx", "off", "--out", str(out)),
        timeout=180,
    )
    assert "relayed chunks/s at 8 streams by SIDECAR_WORKERS" in result.stdout
    scaling = json.loads((out / "scaling.json").read_text())["scaling"]
    assert [row["workers"] for row in scaling] == [1, 2] and scaling[0]["vs_first"] == 1.0
    for row in scaling:
        assert row["errors"] == 0 and row["chunks_per_s"] > 0 and row["cpu_s_per_1k_chunks"] > 0
