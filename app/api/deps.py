"""Shared route dependencies: settings, database sessions, the service, auth."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.errors import Forbidden, NotReady, Unauthorized
from app.service import Service
from app.settings import Settings


def get_service(request: Request) -> Service:
    return request.app.state.service


def get_db(request: Request) -> Iterator[Session]:
    with request.app.state.service.db() as session:
        yield session


def get_read_db(request: Request) -> Iterator[Session]:
    with request.app.state.service.db_read() as session:
        yield session


def get_ready_service(service: Annotated[Service, Depends(get_service)]) -> Service:
    if not service.ready:
        raise NotReady(service.load_error or "the base model is still loading in the worker; retry shortly")
    return service


def require_token(request: Request) -> None:
    settings: Settings = request.app.state.service.settings
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


ServiceDep = Annotated[Service, Depends(get_service)]
ReadyDep = Annotated[Service, Depends(get_ready_service)]
DbDep = Annotated[Session, Depends(get_db)]  # writes: BEGIN IMMEDIATE
ReadDbDep = Annotated[Session, Depends(get_read_db)]  # GETs: never wait for the write lock
