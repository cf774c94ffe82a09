"""k8s/: the manifests a user applies with `kubectl apply -k k8s/`, checked offline as the API server and the
sidecar would take them: against the Kubernetes schemas, against the sidecar's own settings and routes, and
the Grafana dashboard against the series a running sidecar really exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml

from sidecar.settings import ENV_PREFIX, Settings, load_settings
from tests.processes import SidecarProcess

K8S = Path(__file__).resolve().parent.parent / "k8s"
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}  # tests/test_prometheus.py checks the rules with promtool


def _resources() -> dict[str, dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    documents = [yaml.safe_load((K8S / name).read_text()) for name in kustomization["resources"]]
    return {document["kind"]: document for document in documents}


def _container() -> dict[str, Any]:
    container: dict[str, Any] = _resources()["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    return container


def test_every_manifest_is_valid_for_the_kubernetes_api() -> None:
    for kind, document in _resources().items():
        if kind in OPERATOR_KINDS:  # the Prometheus Operator's own resources: their schemas are not Kubernetes'
            continue
        kubernetes_validate.validate(document, kubernetes_validate.latest_version(), strict=True)


def test_the_deployment_configures_the_sidecar_with_settings_it_accepts(monkeypatch: pytest.MonkeyPatch) -> None:
    container = _container()
    env = {item["name"]: item for item in container["env"]}
    sidecar_env = {name: item for name, item in env.items() if name.startswith(ENV_PREFIX)}
    known = {ENV_PREFIX + field.upper() for field in Settings.model_fields}
    assert set(sidecar_env) <= known, set(sidecar_env) - known
    # The literal values as the sidecar reads them from its environment (keys come from the Secret: stand-ins).
    for name, item in sidecar_env.items():
        monkeypatch.setenv(name, item.get("value", "stand-in-key-0123"))
    settings = load_settings(None)
    assert settings.host == "0.0.0.0" and settings.autoload_engine == "vllm" and settings.log_format == "json"
    for name in ("SIDECAR_API_KEYS", "SIDECAR_ADMIN_KEYS"):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "sidecar-keys"  # never a literal key
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1

    # Probes on the sidecar's port and routes: alive at once, ready when the engine is.
    port = container["ports"][0]
    assert port["containerPort"] == settings.port and port["name"] == "http"
    probes = {name: container[name]["httpGet"] for name in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert {probe["port"] for probe in probes.values()} == {"http"}
    assert (probes["startupProbe"]["path"], probes["livenessProbe"]["path"], probes["readinessProbe"]["path"]) == (
        "/health",
        "/health",
        "/ready",
    )
    # SIGTERM drains, then stops the engine: the kubelet must wait for both before SIGKILL.
    grace = _resources()["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= settings.drain_timeout_s + settings.kill_grace_s + 5


def test_the_service_reaches_the_pods_and_prometheus_the_service() -> None:
    resources = _resources()
    pod_labels = resources["Deployment"]["spec"]["template"]["metadata"]["labels"]
    service = resources["Service"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == _container()["ports"][0]["name"]
    monitor = resources["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    port_names = {port["name"] for port in service["spec"]["ports"]}
    assert all(
        endpoint["port"] in port_names and endpoint["path"] == "/metrics" for endpoint in monitor["spec"]["endpoints"]
    )


def test_the_dashboard_plots_only_series_a_running_sidecar_exports(
    start_sidecar: Callable[..., SidecarProcess],
) -> None:
    sidecar = start_sidecar({"SIDECAR_AUTOLOAD_ENGINE": "mock", "SIDECAR_AUTOLOAD_MODEL": "m"})
    sidecar.wait_ready()
    exposition = httpx.get(f"{sidecar.url}/metrics").text
    families = set(re.findall(r"^# TYPE (\S+) (\w+)", exposition, re.MULTILINE))
    exported = {name for name, _ in families}
    exported |= {
        f"{name}_{suffix}" for name, kind in families if kind == "histogram" for suffix in ("bucket", "sum", "count")
    }
    exported |= {f"{name}_total" for name, kind in families if kind == "counter"}

    dashboard = json.loads((K8S / "grafana-dashboard.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    plotted = {name for expr in expressions for name in re.findall(r"\bsidecar_\w+", expr)}
    assert plotted and plotted <= exported, plotted - exported
    titles = " ".join(panel["title"] for panel in dashboard["panels"])
    for wanted in ("first token", "output token", "Inter-token", "Tokens per second", "Engine state", "GPU memory"):
        assert wanted in titles
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["configMapGenerator"][0]["files"] == ["grafana-dashboard.json"]


@pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl is not installed: the render is checked where it is"
)
def test_kubectl_kustomize_renders_what_the_files_say() -> None:
    rendered = subprocess.run(["kubectl", "kustomize", str(K8S)], check=True, capture_output=True, text=True).stdout
    documents = {document["kind"]: document for document in yaml.safe_load_all(rendered)}
    assert set(documents) == {*_resources(), "ConfigMap"}
    for kind, document in documents.items():
        if kind not in OPERATOR_KINDS:
            kubernetes_validate.validate(document, kubernetes_validate.latest_version(), strict=True)
    dashboard = documents["ConfigMap"]["data"]["grafana-dashboard.json"]
    assert json.loads(dashboard)["uid"] == "llm-sidecar"
    assert documents["ConfigMap"]["metadata"]["labels"]["grafana_dashboard"] == "1"
