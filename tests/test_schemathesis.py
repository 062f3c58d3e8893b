"""Schemathesis against the real service (uvicorn on a loopback port, model resident before the
first case): positive and negative phases, no 5xx and no response outside the documented schema
(status codes, content types, bodies).

Over HTTP rather than ASGI on purpose: schemathesis's ASGI transport runs the app's lifespan
itself, which would start a second runtime whose model is still loading (503) during the first
cases."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

import pytest
import schemathesis
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.checks import not_a_server_error

from app.settings import Settings
from tests.service_helpers import thread_server


@pytest.fixture(scope="module")
def api_url(tiny_workspace: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    settings = Settings(workspace=tiny_workspace,
                        artifacts_dir=tmp_path_factory.mktemp("fuzz") / "artifacts",
                        max_queued_jobs=5)
    with thread_server(settings) as (client, _app):  # returns once /readyz answers 200
        yield str(client.base_url).rstrip("/")


def _operations(base_url: str):  # type: ignore[no-untyped-def]
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    # The event stream of a running job never ends by design; it has its own test.
    return [op for op in operations if not op.path.endswith("/events")]


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_api_conforms_to_its_schema(api_url, mode) -> None:  # type: ignore[no-untyped-def]
    operations = _operations(api_url)
    assert len(operations) >= 14
    exercised = 0
    for operation in operations:

        @settings(max_examples=20, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def call(case) -> None:  # type: ignore[no-untyped-def]
            case.call_and_validate(checks=CHECKS)

        try:
            call()
            exercised += 1
        except Unsatisfiable:
            # Nothing can be invalid about an operation whose only inputs are free strings or
            # that has none (GET /jobs/{job_id}, GET /healthz): no negative case exists.
            assert mode is GenerationMode.NEGATIVE, operation.label
    assert exercised == len(operations) if mode is GenerationMode.POSITIVE else exercised >= 4
