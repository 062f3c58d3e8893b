"""Schemathesis in-process against the ASGI app: positive and negative phases, no 5xx and no
response outside the documented schema (status codes, content types, bodies).

Schemathesis's ASGI transport runs the app's lifespan itself (once per test, ended at the test's
teardown), so each test lets it start, then waits until the model is resident before the first
generated case: a case sent while the model loads would get the documented 503."""

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

from app.main import create_app
from app.settings import Settings


@pytest.fixture(scope="module")
def api_app(tiny_workspace: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return create_app(Settings(workspace=tiny_workspace,
                               artifacts_dir=tmp_path_factory.mktemp("fuzz") / "artifacts",
                               max_queued_jobs=5))


def _operations(app):  # type: ignore[no-untyped-def]
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    # The event stream of a running job never ends by design; it has its own test.
    return [op for op in operations if not op.path.endswith("/events")]


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_api_conforms_to_its_schema(api_app, mode) -> None:  # type: ignore[no-untyped-def]
    operations = _operations(api_app)
    healthz = next(op for op in operations if op.path == "/healthz")
    assert healthz.Case().call().status_code == 200  # starts the lifespan: migrations, loading
    runtime = api_app.state.service
    assert runtime.wait_ready(120)
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
    assert api_app.state.service is runtime, "a second lifespan ran during the cases"
    assert exercised == len(operations) if mode is GenerationMode.POSITIVE else exercised >= 4
