"""The metrics of recent requests, by request id, for `GET /v1/requests/{id}`: a bounded ring."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from sidecar.telemetry.records import RequestRecord

# The fingerprint of the key that made a request, kept in its record and never shown: who may read it.
OWNER_FIELD = "_key_fingerprint"


def readable_by(record: RequestRecord, fingerprint: str | None, admin: bool) -> bool:
    """Whether a request's record may be shown to a request with this key: the key that made it, an admin key,
    or anyone where the request was made without a key (no keys configured)."""
    owner = record.get(OWNER_FIELD)
    return admin or owner is None or owner == fingerprint


def shown(record: RequestRecord) -> dict[str, Any]:
    return {key: value for key, value in record.items() if key != OWNER_FIELD}


class RequestHistory:
    def __init__(self, size: int) -> None:
        self.size = size
        self._records: OrderedDict[str, RequestRecord] = OrderedDict()

    def add(self, request_id: str, record: RequestRecord) -> None:
        self._records.pop(request_id, None)  # a reused id: the newest request wins
        self._records[request_id] = record
        if len(self._records) > self.size:
            self._records.popitem(last=False)

    def get(self, request_id: str) -> RequestRecord | None:
        return self._records.get(request_id)
