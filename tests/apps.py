"""The sidecar app in-process, for tests of one layer that need no process boundary."""

from __future__ import annotations

from typing import Any

import httpx

from sidecar.server.app import create_app
from sidecar.settings import load_settings


def client_for(**settings: Any) -> httpx.AsyncClient:
    app = create_app(load_settings(None, **settings))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sidecar")
