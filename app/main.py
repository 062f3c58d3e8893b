"""The FastAPI app: `create_app()` wires settings, service, routers, errors and offline docs."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from anyio import to_thread
from fastapi import Depends, FastAPI
from fastapi_offline import FastAPIOffline
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.deps import require_token
from app.api.errors import install_error_handlers, problem
from app.api.openapi import complete_openapi
from app.api.routes import catalog, health, jobs, submissions, sweeps
from app.service import Service
from app.settings import Settings, get_settings
from merging_core.evaluation.workspace import load_workspace

log = logging.getLogger(__name__)

DESCRIPTION = """
Merge PEFT LoRA adapters on a resident base model, evaluate the merged model on every task
against each task's own adapter (interference), and search merge coefficients.

`POST /merges`, `POST /evaluations` and `POST /sweeps` take the unified merge config (the same
schema as the YAML files) and queue a job; follow it with `GET /jobs/{id}` or
`GET /jobs/{id}/events`. Errors are RFC 9457 `application/problem+json`.
"""


class BodySizeLimit:
    """Refuse request bodies over `limit` bytes with 413, whether or not Content-Length is set."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, receive, send)
            return
        # Read the body up front (at most limit + one chunk), then replay it to the app: a
        # streamed body without Content-Length is capped as well.
        chunks: list[bytes] = []
        received = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.limit:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = problem(413, "Request body too large",
                           f"the request body exceeds {self.limit} bytes")
        await response(scope, receive, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Sync routes run in AnyIO's thread pool; its size bounds how many threads contend for
        # the interpreter lock at once (measured: see the README's API latency section).
        to_thread.current_default_thread_limiter().total_tokens = settings.api_threads
        service = Service(settings)
        app.state.service = service
        app.openapi()  # the document reads the registry and the workspace now, at start-up
        service.start()
        try:
            yield
        finally:
            service.stop()

    app = FastAPIOffline(
        title="LoRA Merge Service",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        responses={},
    )
    install_error_handlers(app)
    secured = [Depends(require_token)]
    app.include_router(health.router)
    for router in (submissions.router, jobs.router, sweeps.router, catalog.router):
        app.include_router(router, dependencies=secured)
    app.add_middleware(BodySizeLimit, limit=settings.max_body_bytes)
    fastapi_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            service = getattr(app.state, "service", None)
            workspace = service.workspace if service is not None else load_workspace(settings.workspace_file())
            app.openapi_schema = complete_openapi(fastapi_openapi(), tasks=list(workspace.tasks))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
