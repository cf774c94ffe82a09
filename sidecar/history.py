"""The metrics of recent requests, by request id, for `GET /v1/requests/{id}`: a bounded ring."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any


class RequestHistory:
    def __init__(self, size: int) -> None:
        self.size = size
        self._records: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def add(self, request_id: str, record: dict[str, Any]) -> None:
        self._records.pop(request_id, None)  # a reused id: the newest request wins
        self._records[request_id] = record
        if len(self._records) > self.size:
            self._records.popitem(last=False)

    def get(self, request_id: str) -> dict[str, Any] | None:
        return self._records.get(request_id)
