"""The data plane's own route: the metrics of a recent request (the others are the proxy's, `routes.py`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from sidecar import request_state
from sidecar.errors import NotFound
from sidecar.server.auth import holds_one_of
from sidecar.server.request_context import incoming_request_id
from sidecar.settings import Settings
from sidecar.telemetry.history import RequestHistory, readable_by, shown
from sidecar.telemetry.records import RequestRecord

FindElsewhere = Callable[[str], Awaitable[RequestRecord | None]]


async def request_metrics(request: Request) -> Response:
    """A recent request's record: this process's, else (a data-plane worker) the one another worker kept. Only to
    the key that made the request, or an admin key: to any other it does not exist."""
    history: RequestHistory = request.app.state.history
    request_id = incoming_request_id(request.path_params["request_id"])
    if request_id is None:  # not an id the sidecar takes or gives: nothing to look up, nor to echo at any length
        raise NotFound(
            "no request has this id: ids are 1 to 128 letters, digits and '._:-', as X-Request-ID takes them",
            param="request_id",
        )
    record = history.get(request_id)
    find_elsewhere: FindElsewhere | None = request.app.state.find_elsewhere
    if record is None and find_elsewhere is not None:
        record = await find_elsewhere(request_id)
    if record is not None:
        settings: Settings = request.app.state.settings
        admin = holds_one_of(request.scope, settings.control_keys)
        # The fingerprint auth took of the request's key, as the proxy kept it in the record of the one it made.
        if not readable_by(record, request_state.of(request.scope).log_fields.get("key_fingerprint"), admin):
            record = None
    if record is None:
        raise NotFound(
            f"no recent request with id {request_id!r} for this key (the last {history.size} are kept)",
            param="request_id",
        )
    return JSONResponse(shown(record))
