"""Shared route dependencies: settings, database sessions, the runtime, auth."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.errors import Forbidden, NotReady, Unauthorized
from app.runtime import Runtime
from app.settings import Settings


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def get_db(request: Request) -> Iterator[Session]:
    with request.app.state.runtime.db() as session:
        yield session


def get_read_db(request: Request) -> Iterator[Session]:
    with request.app.state.runtime.db_read() as session:
        yield session


def get_ready_runtime(runtime: Annotated[Runtime, Depends(get_runtime)]) -> Runtime:
    if runtime.session is None:
        raise NotReady(runtime.load_error or "the base model is still loading; retry shortly")
    return runtime


def require_token(request: Request) -> None:
    settings: Settings = request.app.state.runtime.settings
    if settings.token is None:
        return
    header = request.headers.get("authorization", "")
    if not header:
        raise Unauthorized("missing Authorization: Bearer <token> header")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.strip().encode(), settings.token.get_secret_value().encode()
    ):
        raise Forbidden("invalid bearer token")


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
ReadyDep = Annotated[Runtime, Depends(get_ready_runtime)]
DbDep = Annotated[Session, Depends(get_db)]  # writes: BEGIN IMMEDIATE
ReadDbDep = Annotated[Session, Depends(get_read_db)]  # GETs: never wait for the write lock
