"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.api.deps import RuntimeDep
from app.api.schemas import Health

router = APIRouter(tags=["health"])


def _health(runtime: RuntimeDep) -> Health:
    session = runtime.session
    return Health(
        status="ok" if runtime.load_error is None else "error",
        ready=session is not None,
        device=str(session.holder.device) if session  # resolved; before: as configured
        else runtime.settings.device or runtime.workspace.spec.base_model.device,
        model=str(runtime.workspace.base_model_path().name) if session else None,
        workspace=runtime.workspace.name,
        error=runtime.load_error,
    )


@router.get("/healthz", response_model=Health, operation_id="healthz", summary="Liveness: answers at once")
def healthz(runtime: RuntimeDep) -> Health:
    return _health(runtime)


@router.get("/readyz", response_model=Health, operation_id="readyz",
            summary="Readiness: 200 once the base model is resident, 503 before",
            responses={503: {"model": Health, "description": "model not loaded yet"}})
def readyz(runtime: RuntimeDep) -> JSONResponse:
    health = _health(runtime)
    return JSONResponse(health.model_dump(), status_code=200 if health.ready else 503)
