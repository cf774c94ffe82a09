"""A bounded soak (`bench/soak.py`): 256 streams for 40 s through a real sidecar and mock engine, clients
leaving mid-stream, the engine killed every 4 s and restarted by the policy, unloaded and loaded again half-way."""

from __future__ import annotations

import json

import pytest

from bench.soak import parser, run

pytestmark = pytest.mark.slow


@pytest.mark.timeout(300)  # about a minute: warm-up, 40 s of soak, and the pool's idle time before and after
def test_a_soak_with_crashes_and_disconnects_leaves_nothing_behind_and_cuts_no_stream_silently() -> None:
    result = run(parser().parse_args(["--seconds", "40", "--crash-every", "4"]))
    assert result["passed"], json.dumps(result, indent=2)
    assert result["outcomes"]["complete"] > 0 and result["outcomes"]["client_left"] > 0
    assert result["engine_kills"] >= 2
