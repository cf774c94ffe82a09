"""A hosted engine with a key: the mock engine serving https with a certificate from a CA made for the test (as a
private CA would sign it), and requiring vLLM's `--api-key`; the sidecar loads it as `external` with that key."""

from __future__ import annotations

import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from openai import OpenAI

from tests.processes import SidecarProcess, free_port, wait_until

KEY = "client-key-0123"  # the sidecar's own key, which clients use
ENGINE_KEY = "hosted-engine-key-5c1a9e77b2"  # the hosted engine's: only the sidecar has it
ORG = "org-hosted-42aa"
AUTH = {"Authorization": f"Bearer {KEY}"}
MESSAGES = [{"role": "user", "content": "tell me about clocks"}]


@dataclass
class HostedEngine:
    url: str
    ca_file: Path

    def load_body(self, **fields: Any) -> dict[str, Any]:
        return {"engine": "external", "model": "hosted", "url": self.url, "api_key": ENGINE_KEY} | fields


@pytest.fixture(scope="module")
def hosted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostedEngine]:
    workdir = tmp_path_factory.mktemp("hosted")
    ca = trustme.CA()
    certificate = ca.issue_cert("localhost")
    ca_file, key_file, cert_file = workdir / "ca.pem", workdir / "engine.key", workdir / "engine.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    certificate.private_key_pem.write_to_path(str(key_file))
    certificate.cert_chain_pems[0].write_to_path(str(cert_file))
    port = free_port()
    engine = subprocess.Popen(
        [sys.executable, "-m", "engines.mock_server", "--port", str(port), "--model", "hosted"]
        + ["--api-key", ENGINE_KEY, "--ssl-keyfile", str(key_file), "--ssl-certfile", str(cert_file)]
    )
    url = f"https://localhost:{port}"
    trusting = ssl.create_default_context(cafile=ca_file)

    def answers() -> bool:
        try:
            return httpx.get(f"{url}/health", verify=trusting).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(answers, timeout_s=20)
        yield HostedEngine(url, ca_file)
    finally:
        engine.kill()
        engine.wait()


def _load(sidecar: SidecarProcess, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{sidecar.url}/v1/model/load", json=body, headers=AUTH, timeout=30)


def test_hosted_engine_gets_its_key_over_verified_https_and_no_log_or_status_shows_it(
    hosted: HostedEngine, start_sidecar: Callable[..., SidecarProcess]
) -> None:
    sidecar = start_sidecar(
        {"SIDECAR_API_KEYS": KEY, "SIDECAR_UPSTREAM_CA_FILE": str(hosted.ca_file), "SIDECAR_LOG_LEVEL": "debug"}
    )
    loaded = _load(sidecar, hosted.load_body(headers={"X-Org": ORG}))
    assert loaded.status_code == 200, loaded.text

    # The engine refuses anyone without its key: an answer means the sidecar sent it, over TLS it verified.
    client = OpenAI(base_url=f"{sidecar.url}/v1", api_key=KEY, max_retries=0, timeout=30)
    chunks = list(
        client.chat.completions.create(
            model="hosted",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},  # type: ignore[arg-type]
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = chunks[-1].usage
    assert usage is not None and usage.model_dump()["performance"]["ttft_ms"] > 0
    whole = client.chat.completions.create(model="hosted", messages=MESSAGES)  # type: ignore[arg-type]
    assert whole.usage is not None and whole.usage.model_dump()["performance"]["engine"] == "external"

    # What the engine receives: its own key and headers, never the client's key.
    body = {"model": "hosted", "messages": MESSAGES, "max_tokens": 1}
    sent = httpx.post(f"{sidecar.url}/v1/chat/completions", json=body, headers={"X-API-Key": KEY}, timeout=10)
    assert sent.status_code == 200, sent.text
    trusting = ssl.create_default_context(cafile=hosted.ca_file)
    seen = httpx.get(f"{hosted.url}/mock/last-headers", verify=trusting).json()
    assert seen["authorization"] == f"Bearer {ENGINE_KEY}"
    assert seen["x-org"] == ORG and "x-api-key" not in seen

    status = httpx.get(f"{sidecar.url}/v1/model", headers=AUTH).text
    assert status and ENGINE_KEY not in status and ORG not in status
    sidecar.stop()
    output = sidecar.output()
    assert "model_ready" in output and ENGINE_KEY not in output and ORG not in output


def test_an_engine_whose_certificate_does_not_verify_is_refused_at_once(
    hosted: HostedEngine, start_sidecar: Callable[..., SidecarProcess]
) -> None:
    sidecar = start_sidecar({"SIDECAR_API_KEYS": KEY})  # the system's CAs only: they did not sign it
    response = _load(sidecar, hosted.load_body())
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "engine_unreachable" and "CERTIFICATE_VERIFY_FAILED" in error["message"]
    assert httpx.get(f"{sidecar.url}/v1/model", headers=AUTH).json()["state"] == "failed"


def test_a_key_the_engine_refuses_is_a_502_at_once_not_a_wait_for_the_startup_timeout(
    hosted: HostedEngine, start_sidecar: Callable[..., SidecarProcess]
) -> None:
    sidecar = start_sidecar({"SIDECAR_API_KEYS": KEY, "SIDECAR_UPSTREAM_CA_FILE": str(hosted.ca_file)})
    response = _load(sidecar, hosted.load_body(api_key="not-the-engine-key"))
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "engine_unauthorized"
    without_key = _load(sidecar, {k: v for k, v in hosted.load_body().items() if k != "api_key"})
    assert without_key.status_code == 502 and without_key.json()["error"]["code"] == "engine_unauthorized"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"engine": "mock", "url": None}, "api_key"),  # a started engine gets the key the sidecar makes
        ({"engine": "mock", "url": None, "api_key": None, "headers": {"X-Org": ORG}}, "headers"),
        ({"headers": {"Host": "elsewhere"}}, "headers"),  # the sidecar's own headers cannot be replaced
        ({"headers": {"Authorization": "Bearer x"}}, "headers"),
        ({"headers": {"X-Org": "a\r\nX-Injected: 1"}}, "headers"),
        ({"headers": {"Bad Name": "x"}}, "headers"),
        ({"headers": {"X-Org": "org-€"}}, "headers"),  # no one encoding in a request's head
        ({"api_key": ""}, "api_key"),
        ({"api_key": "sk-bad\r\nX-Injected: 1"}, "api_key"),
        ({"api_key": "sk-bad-€"}, "api_key"),
    ],
)
def test_bad_keys_and_headers_are_a_400_that_changes_nothing(
    hosted: HostedEngine, start_sidecar: Callable[..., SidecarProcess], fields: dict[str, Any], param: str
) -> None:
    sidecar = start_sidecar({"SIDECAR_API_KEYS": KEY, "SIDECAR_UPSTREAM_CA_FILE": str(hosted.ca_file)})
    response = _load(sidecar, hosted.load_body() | fields)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"].startswith(param)
    assert ENGINE_KEY not in response.text and "sk-bad" not in response.text  # no key echoed, good or bad
    assert httpx.get(f"{sidecar.url}/v1/model", headers=AUTH).json()["state"] == "idle"
