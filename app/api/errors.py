"""RFC 9457 problem+json for every error, mapped in this one module.

Library errors (`merging_core.MergeError` and subclasses) become 422 (or 403 for paths outside
the allowed roots, which the service checks before opening anything); service errors carry their
own status; request validation errors list each bad field.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.errors import ServiceError
from merging_core.errors import Cancelled, MergeError

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"


class Problem(BaseModel):
    """An RFC 9457 problem detail."""

    type: str = Field(default="about:blank", examples=["about:blank"])
    title: str = Field(examples=["Invalid request"])
    status: int = Field(examples=[422])
    detail: str = Field(examples=["method 'ties': parameter 'k'=120 is out of range; allowed [0, 100]"])
    instance: str | None = Field(default=None, examples=["/merges"])
    errors: list[dict[str, Any]] | None = Field(
        default=None, description="one item per invalid field (validation errors)"
    )


_DESCRIPTIONS = {
    401: "Missing bearer token",
    403: "Wrong token, or a path outside the allowed roots",
    404: "Not found",
    409: "Conflict with the job's state",
    413: "Request body too large",
    422: "Invalid request (names the bad field, parameter or path)",
    429: "Too many queued jobs",
    503: "The base model is not loaded yet",
}


def problem_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` documenting problem+json errors."""
    return {
        code: {
            "description": _DESCRIPTIONS[code],
            "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
        for code in codes
    }


def problem(status: int, title: str, detail: str, request: Request | None = None,
            errors: list[dict[str, Any]] | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = Problem(title=title, status=status, detail=detail,
                   instance=request.url.path if request else None, errors=errors)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status,
                        media_type=PROBLEM_JSON, headers=headers)


def _validation_detail(errors: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    items = []
    for error in errors:
        if error.get("type") == "json_invalid":
            reason = (error.get("ctx") or {}).get("error", "invalid JSON")
            items.append({"field": "(body)", "message": f"the body is not valid JSON: {reason}"})
            continue
        location = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
        items.append({"field": location or "(body)", "message": error.get("msg", "invalid")})
    detail = "; ".join(f"{i['field']}: {i['message']}" for i in items) or "invalid request"
    return detail, items


def _allowed_methods(request: Request, fallback: str | None) -> str | None:
    """The methods the OpenAPI document gives this path (one path may be served by routes of
    several routers, as GET and POST /evaluations are, where Starlette's own 405 names only the
    first route's); `fallback` for paths it leaves out (the docs)."""
    for template, item in request.app.openapi()["paths"].items():
        pattern = re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template))
        if re.fullmatch(pattern, request.url.path):
            return ", ".join(sorted(method.upper() for method in item))
    return fallback


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail, items = _validation_detail(list(exc.errors()))
        return problem(422, "Invalid request", detail, request, items)

    @app.exception_handler(ServiceError)
    async def _service(request: Request, exc: ServiceError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
        if exc.retry_after is not None:
            headers["Retry-After"] = str(exc.retry_after)
        return problem(exc.status, exc.title, str(exc), request, headers=headers or None)

    @app.exception_handler(Cancelled)
    async def _cancelled(request: Request, exc: Cancelled) -> JSONResponse:
        return problem(409, "Cancelled", str(exc), request)

    @app.exception_handler(MergeError)
    async def _merge(request: Request, exc: MergeError) -> JSONResponse:
        return problem(422, "Invalid request", str(exc), request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # an unparseable body (e.g. not UTF-8): a validation error
            return problem(422, "Invalid request", f"the body is not valid JSON: {exc.detail}", request)
        title = {404: "Not found", 405: "Method not allowed"}.get(exc.status_code, "HTTP error")
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # RFC 9110: a 405 lists what the resource allows
            allowed = _allowed_methods(request, headers.pop("Allow", None))
            if allowed:
                headers["Allow"] = allowed
        return problem(exc.status_code, title, str(exc.detail), request, headers=headers or None)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return problem(500, "Internal error", "an unexpected error occurred; see the server log",
                       request)
