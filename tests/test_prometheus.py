"""The Grafana dashboard and the alerting rules in k8s/ against a real Prometheus (Debian's `prometheus`, which
`.ci/run` installs): Prometheus scrapes real sidecars (one data-plane worker and several) in front of the mock
engine under a short load, and every query of `k8s/grafana-dashboard.json` is evaluated through its HTTP API as
Grafana would send it. `promtool` checks the sidecar's exposition and the rules, and runs the rules' unit tests.

Without the binaries each test is skipped, naming them."""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.processes import SidecarProcess, free_port, wait_until

K8S = Path(__file__).resolve().parent.parent / "k8s"
PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None,
    reason="prometheus and promtool are not installed (Debian's `prometheus` package: .ci/run installs it)",
)
pytestmark = [pytest.mark.slow, needs_prometheus]

NAMESPACE = "llm"
SCRAPE_S = 1
# Grafana's $__rate_interval: at least four scrape intervals.
RATE_INTERVAL = "15s"
# The mock engine's delays: the TTFT the quantiles must find, and answers of a quarter of a second, so that the
# load spans several scrapes (a rate needs the counters to move between two of them).
MOCK_ARGS = {"ttft-ms": 100, "itl-ms": 20, "tokens": 8}
REQUESTS = 24
GPU_SERIES = ("sidecar_gpu_memory_used_bytes", "sidecar_engine_gpu_memory_bytes")
Start = Callable[..., SidecarProcess]


def _dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL as Grafana sends it) for every target of the dashboard."""
    dashboard = json.loads((K8S / "grafana-dashboard.json").read_text())
    return [
        (panel["title"], target["expr"].replace("$namespace", NAMESPACE).replace("$__rate_interval", RATE_INTERVAL))
        for panel in dashboard["panels"]
        for target in panel["targets"]
    ]


class Prometheus:
    def __init__(self, directory: Path, targets: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s"},
            "scrape_configs": [
                {
                    "job_name": "llm-sidecar",
                    "static_configs": [
                        # The labels the ServiceMonitor's targets get in a cluster, which the dashboard selects.
                        {"targets": [target], "labels": {"namespace": NAMESPACE, "pod": f"sidecar-{index}"}}
                        for index, target in enumerate(targets)
                    ],
                }
            ],
        }
        (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = (directory / "prometheus.log").open("w")
        self.process = subprocess.Popen(
            [
                str(PROMETHEUS),
                f"--config.file={directory / 'prometheus.yml'}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_until(self._ready, timeout_s=30, interval_s=0.1)

    def _ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def query(self, promql: str) -> list[dict[str, Any]]:
        answer = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=10).json()
        assert answer["status"] == "success", (promql, answer)
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self.log.close()


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[list[str]], Prometheus]]:
    started: list[Prometheus] = []

    def start(targets: list[str]) -> Prometheus:
        started.append(Prometheus(tmp_path, targets))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def _stream_chats(sidecar: SidecarProcess, requests: int) -> list[float]:
    """Streamed chats through the sidecar, one after another; the TTFT each one's `usage.performance` reports."""
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    body["stream_options"] = {"include_usage": True}
    ttfts = []
    with httpx.Client(base_url=sidecar.url, timeout=30) as client:
        for _ in range(requests):
            answer = client.post("/v1/chat/completions", json=body)
            assert answer.status_code == 200, answer.text
            usage = next(json.loads(line[6:])["usage"] for line in answer.text.splitlines() if '"performance"' in line)
            ttfts.append(usage["performance"]["ttft_ms"])
    return ttfts


@pytest.mark.parametrize("workers", [1, 3])
def test_every_dashboard_query_returns_data_from_a_real_prometheus(
    start_sidecar: Start, prometheus: Callable[[list[str]], Prometheus], workers: int
) -> None:
    sidecar = start_sidecar(
        {
            "SIDECAR_WORKERS": str(workers),
            "SIDECAR_AUTOLOAD_ENGINE": "mock",
            "SIDECAR_AUTOLOAD_MODEL": "m",
            "SIDECAR_AUTOLOAD_ARGS": json.dumps(MOCK_ARGS),
        }
    )
    sidecar.wait_ready(30)
    server = prometheus([f"127.0.0.1:{sidecar.port}"])
    # Prometheus takes its targets in a few seconds after it starts: the load begins once it scrapes.
    wait_until(lambda: bool(server.query("up == 1")), timeout_s=30, interval_s=0.2)
    ttfts = _stream_chats(sidecar, REQUESTS)
    # Scraped after the last request: Prometheus has every request the sidecar counted.
    chats = 'sum(sidecar_requests_total{route="/v1/chat/completions"})'
    wait_until(lambda: float(server.query(chats)[0]["value"][1]) >= len(ttfts), timeout_s=30, interval_s=0.2)
    gpus = server.query("sidecar_gpu_memory_used_bytes")
    for title, promql in _dashboard_queries():
        result = server.query(promql)
        if any(name in promql for name in GPU_SERIES) and not gpus:
            assert result == [], (title, promql)  # no GPU here: the series have no samples
            continue
        assert result, f"{title}: no series for {promql}"

    # The TTFT quantile the dashboard plots agrees with what the requests reported, within the bucket's width.
    p50 = _dashboard_queries()[0][1]
    assert "histogram_quantile(0.5" in p50 and "sidecar_ttft_seconds_bucket" in p50
    plotted = float(server.query(p50)[0]["value"][1]) * 1000
    reported = statistics.median(ttfts)
    low, high = _bucket_around(server, "sidecar_ttft_seconds_bucket", reported / 1000)
    assert low * 1000 <= plotted <= high * 1000, (plotted, reported, low, high)
    assert MOCK_ARGS["ttft-ms"] <= reported < high * 1000


def _bucket_around(server: Prometheus, bucket_series: str, value: float) -> tuple[float, float]:
    """The bounds of the histogram bucket that holds `value`."""
    bounds = sorted({float(s["metric"]["le"]) for s in server.query(bucket_series)})
    upper = next(bound for bound in bounds if bound >= value)
    lower = max((bound for bound in bounds if bound < upper), default=0.0)
    return lower, upper


@pytest.mark.parametrize("workers", [1, 3])
def test_promtool_finds_the_sidecars_exposition_well_formed(start_sidecar: Start, workers: int) -> None:
    env = {"SIDECAR_WORKERS": str(workers), "SIDECAR_AUTOLOAD_ENGINE": "mock", "SIDECAR_AUTOLOAD_MODEL": "m"}
    sidecar = start_sidecar(env)
    sidecar.wait_ready(30)
    _stream_chats(sidecar, 3)
    exposition = httpx.get(f"{sidecar.url}/metrics").text
    assert re.search(r"^sidecar_ttft_seconds_bucket", exposition, re.MULTILINE)
    checked = subprocess.run(
        [str(PROMTOOL), "check", "metrics"], input=exposition, capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def _rule_groups(directory: Path) -> Path:
    """The PrometheusRule's groups as a plain rules file, as the Prometheus Operator hands them to Prometheus."""
    rule = yaml.safe_load((K8S / "prometheus-rules.yaml").read_text())
    assert rule["kind"] == "PrometheusRule"
    path = directory / "sidecar-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    return path


def test_the_alerting_rules_pass_promtools_check_and_their_unit_tests(tmp_path: Path) -> None:
    rules = _rule_groups(tmp_path)
    checked = subprocess.run([str(PROMTOOL), "check", "rules", str(rules)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tests = yaml.safe_load((K8S / "prometheus-rules.test.yaml").read_text())
    tests["rule_files"] = [str(rules)]
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests))
    tested = subprocess.run(
        [str(PROMTOOL), "test", "rules", str(tmp_path / "tests.yaml")], capture_output=True, text=True, timeout=60
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    alerts = {r["alert"] for group in yaml.safe_load(rules.read_text())["groups"] for r in group["rules"]}
    tested_alerts = {alert["alertname"] for case in tests["tests"] for alert in case.get("alert_rule_test", [])}
    assert alerts == tested_alerts  # every alert has a test that fires it
