"""The service's exception tree (below the routes nothing raises HTTPException)."""

from __future__ import annotations

from typing import Any

from merging_core.errors import MergeError


class ServiceError(Exception):
    """Root of the service's own errors; each maps to one HTTP status in app.api.errors."""

    status = 500
    title = "Internal error"

    def __init__(self, detail: str, *, retry_after: int | None = None) -> None:
        super().__init__(detail)
        # Seconds after which the same request may succeed (sent as `Retry-After`).
        self.retry_after = retry_after


class NotFound(ServiceError):
    status, title = 404, "Not found"


class Conflict(ServiceError):
    status, title = 409, "Conflict"


class QueueFull(ServiceError):
    status, title = 429, "Too many queued jobs"


class Forbidden(ServiceError):
    status, title = 403, "Forbidden"


class Unauthorized(ServiceError):
    status, title = 401, "Unauthorized"


class PayloadTooLarge(ServiceError):
    status, title = 413, "Request body too large"


class InvalidRequest(ServiceError):
    status, title = 422, "Invalid request"


class NotReady(ServiceError):
    status, title = 503, "Model not loaded yet"


class WorkerDied(ServiceError):
    """The workers (Ray actors) running a job's work died too often: killed, out of memory,
    or their node lost. A job's error, never an HTTP answer."""

    status, title = 500, "Worker died"


def error_payload(exc: BaseException) -> dict[str, Any]:
    """The structured `error` of a failed job."""
    if isinstance(exc, ServiceError):
        return {"type": type(exc).__name__, "status": exc.status, "detail": str(exc)}
    if isinstance(exc, MergeError):
        return {"type": type(exc).__name__, "status": 422, "detail": str(exc)}
    return {"type": type(exc).__name__, "status": 500, "detail": str(exc) or type(exc).__name__}
