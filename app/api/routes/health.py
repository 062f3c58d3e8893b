"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.api.deps import ServiceDep
from app.api.schemas import Health

router = APIRouter(tags=["health"])


def _health(service: ServiceDep) -> Health:
    worker = service.executor.state.info if service.ready else None
    return Health(
        status="ok" if service.load_error is None else "error",
        ready=worker is not None,
        device=worker["device"] if worker  # resolved by the worker; before: as configured
        else service.settings.device or service.workspace.spec.base_model.device,
        model=worker["model"] if worker else None,
        workspace=service.workspace.name,
        error=service.load_error,
        executor=service.settings.executor,
        actors=getattr(service.executor.state, "actors", None),
    )


@router.get("/healthz", response_model=Health, operation_id="healthz", summary="Liveness: answers at once")
def healthz(service: ServiceDep) -> Health:
    return _health(service)


@router.get("/readyz", response_model=Health, operation_id="readyz",
            summary="Readiness: 200 once the base model is resident (with Ray: on at least one "
            "actor), 503 before",
            responses={503: {"model": Health, "description": "model not loaded yet"}})
def readyz(service: ServiceDep) -> JSONResponse:
    health = _health(service)
    return JSONResponse(health.model_dump(), status_code=200 if health.ready else 503)
