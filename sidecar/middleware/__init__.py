"""Pure ASGI middleware: each a plain class that stores its settings and wraps `(scope, receive, send)`."""

from sidecar.middleware.auth import AuthMiddleware, Plane, plane_for
from sidecar.middleware.body_limit import BodyLimitMiddleware
from sidecar.middleware.request_context import RequestContextMiddleware

__all__ = ["AuthMiddleware", "BodyLimitMiddleware", "Plane", "RequestContextMiddleware", "plane_for"]
