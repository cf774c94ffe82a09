"""API keys: `Authorization: Bearer <key>` or `X-API-Key: <key>`, compared in constant time, never logged."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable, Sequence

from starlette.types import Scope

from sidecar import request_state
from sidecar.errors import Forbidden, Unauthorized
from sidecar.http import header
from sidecar.server.endpoint import Plane


def _fingerprint(key: str) -> str:
    """What the logs show instead of a key (the first 12 hex digits of its SHA-256): enough to tell keys apart,
    useless to an attacker."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _digest(key: str) -> bytes:
    """What keys are compared by. Digests have one length, so compare_digest does not even leak the key's length.
    BLAKE2b is CPython's own: OpenSSL's SHA-256 went through 25 µs of code a request (its provider lookup, cold
    between the requests of one stream), this 8."""
    return hashlib.blake2b(key.encode(), digest_size=32).digest()


def _presented_key(scope: Scope) -> str | None:
    authorization = header(scope, b"authorization")
    if authorization:
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
    api_key = header(scope, b"x-api-key")
    return api_key.strip() if api_key and api_key.strip() else None


def _matches(presented: bytes, digests: Iterable[bytes]) -> bool:
    """Whether a presented key's digest is one of `digests`: constant time, with no early exit (every one compared)."""
    matched = False
    for digest in digests:
        matched |= hmac.compare_digest(presented, digest)
    return matched


def holds_one_of(scope: Scope, keys: Iterable[str]) -> bool:
    """Whether the request presented one of `keys`."""
    key = _presented_key(scope)
    return key is not None and _matches(_digest(key), (_digest(candidate) for candidate in keys))


class Auth:
    """Every request's key checked against the plane its path needs (the route table's `Planes`)."""

    def __init__(self, data_keys: Sequence[str], control_keys: Sequence[str], plane_of: Callable[[str], Plane]) -> None:
        self.plane_of = plane_of
        digested = {key: _digest(key) for key in (*data_keys, *control_keys)}
        self.digests = {
            Plane.DATA: [digested[key] for key in data_keys],
            Plane.CONTROL: [digested[key] for key in control_keys],
        }
        # An accepted key's fingerprint by its digest, worked out once rather than on every request.
        self.fingerprints = {digest: _fingerprint(key) for key, digest in digested.items()}

    def check(self, scope: Scope) -> None:
        """Raise the 401 or 403 this request earns; return where it may pass (an open path, no keys configured,
        or a key accepted)."""
        plane = self.plane_of(scope["path"])
        accepted = self.digests.get(plane)
        if not accepted:  # an open path, or no keys configured (loopback only)
            return
        key = _presented_key(scope)
        if key is None:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
        presented = _digest(key)
        matched = _matches(presented, accepted)
        # Looked up only once the key matched: a key's digest is no clue to the key.
        fingerprint = self.fingerprints.get(presented) if matched else None
        request_state.of(scope).log_fields["key_fingerprint"] = fingerprint or _fingerprint(key)
        if not matched:
            message = "invalid API key"
            if plane is Plane.CONTROL:
                message += " for the control plane (an admin key is needed)"
            raise Forbidden(message)
