"""Schemathesis in process against the ASGI app, as `schemathesis run --checks all` does it: the
same engine, every check (positive and negative data), every phase (examples, coverage,
fuzzing, stateful: the OpenAPI links), with the checked-in `schemathesis.toml`. Zero failures.

Schemathesis' ASGI transport starts the app's lifespan once, when the schema is loaded, and
keeps it for the process; the test waits until the model is resident before the first case
(one sent while the model loads would get the documented 503) and ends the lifespan itself."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import schemathesis
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import Status, StopReason, events, from_schema
from schemathesis.python import asgi

from app.main import create_app
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
# As the CLI run (`--max-examples 25`); a fixed seed makes a failure reproducible.
MAX_EXAMPLES = 25
SEED = 0


@pytest.fixture(scope="module")
def api_app(tiny_workspace: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    app = create_app(Settings(workspace=tiny_workspace,
                              artifacts_dir=tmp_path_factory.mktemp("fuzz") / "artifacts",
                              max_queued_jobs=5))
    yield app
    asgi.shutdown_lifespans()  # stops the service and its worker process


def _config() -> SchemathesisConfig:
    config = SchemathesisConfig.from_path(ROOT / "schemathesis.toml")
    config.update(seed=SEED, max_failures=None)
    project = config.projects.override
    project.checks.update(included_check_names=["all"])
    project.generation.update(max_examples=MAX_EXAMPLES)
    return config


def _failures(event: events.EngineEvent) -> list[str]:
    if isinstance(event, (events.ScenarioFinished, events.FuzzScenarioFinished)):
        return [f"{event.recorder.label}: {check.name}: "
                f"{check.failure_info.failure.title if check.failure_info else ''}"
                for checks in event.recorder.checks.values() for check in checks
                if check.status == Status.FAILURE]
    if isinstance(event, events.NonFatalError):
        return [f"{event.label}: error: {event.info}"]
    if isinstance(event, events.FatalError):
        return [f"fatal: {event.exception!r}"]
    if isinstance(event, events.EngineFinished):
        return [f"after run: {failure.title}" for failure in event.failures]
    return []


# The fuzzer sends the legacy config keys the schema lists as deprecated, thousands of times.
@pytest.mark.filterwarnings("ignore:config key:DeprecationWarning")
def test_api_passes_every_schemathesis_check(api_app) -> None:  # type: ignore[no-untyped-def]
    schema = schemathesis.openapi.from_asgi("/openapi.json", api_app, config=_config())
    runtime = api_app.state.service  # loading the schema started the lifespan
    assert runtime.wait_ready(120)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 16

    started = time.monotonic()
    failures: list[str] = []
    phases: dict[str, Status] = {}
    finished = None
    for event in from_schema(schema).execute():
        failures += _failures(event)
        if isinstance(event, events.PhaseFinished):
            phases[event.phase.name.value] = event.status
        if isinstance(event, events.EngineFinished):
            finished = event
    assert finished is not None and finished.stop_reason is StopReason.COMPLETED
    assert not failures, f"{len(failures)} failure(s), seed {SEED}:\n" + "\n".join(sorted(set(failures)))
    # Every phase ran, the stateful one (following the links) included.
    assert {"examples", "coverage", "fuzzing", "stateful"} <= set(phases), phases
    assert Status.SKIP not in {phases["coverage"], phases["fuzzing"], phases["stateful"]}, phases
    assert api_app.state.service is runtime, "a second lifespan ran during the cases"
    print(f"schemathesis --checks all: {time.monotonic() - started:.1f}s, phases {phases}")
