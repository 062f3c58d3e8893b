"""The bad-input catalogue over HTTP: right status, problem+json naming the problem, nothing written."""

from __future__ import annotations

import os
from contextlib import contextmanager
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr

from app.settings import Settings
from tests.service_helpers import thread_server, wait_job

MERGE = {"adapters": ["topic", "mood"], "method": "ties"}


@pytest.fixture(scope="module")
def served(tiny_workspace: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    artifacts = tmp_path_factory.mktemp("errors") / "artifacts"
    settings = Settings(workspace=tiny_workspace, artifacts_dir=artifacts, max_body_bytes=4096,
                        max_queued_jobs=1)
    with thread_server(settings) as (client, app):
        yield client, app, artifacts


def _problem(response, status: int, *fragments: str) -> dict:  # type: ignore[no-untyped-def]
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status and body["title"]
    for fragment in fragments:
        assert fragment in body["detail"], body["detail"]
    return body


def _state(client, artifacts: Path) -> tuple[set[Path], int]:  # type: ignore[no-untyped-def]
    """Every file under the artifacts dir (but the database's own) and the number of jobs."""
    files = {p for p in artifacts.rglob("*") if not p.name.startswith("merge_service.db")}
    return files, len(client.get("/jobs", params={"limit": 200}).json()["jobs"])


@contextmanager
def nothing_written(client, artifacts: Path):  # type: ignore[no-untyped-def]
    before = _state(client, artifacts)
    yield
    assert _state(client, artifacts) == before, "a refused request wrote files or a job"


@pytest.mark.parametrize(
    "body, fragments",
    [
        ({"adapters": ["topic", "mood"], "method": "tiess"}, ["unknown merge method 'tiess'"]),
        ({"adapters": ["topic", "mood"], "method": "ties", "method_params": {"k": "twenty"}},
         ["'k' must be a number"]),
        ({"adapters": ["topic", "mood"], "method": "ties", "method_params": {"k": 150}},
         ["'k'=150 is out of range; allowed [0, 100]"]),
        ({"adapters": "topic", "method": "ties"}, ["adapters"]),
        ({"adapters": ["topic", "mood"], "method": "ties", "eval_tasks": ["asr"]}, ["unknown task 'asr'"]),
        ({"adapters": ["topic", "moood"], "method": "ties"}, ["'moood' is not a task", "topic"]),
        ({"adapters": ["topic", "mood"], "method": "ties", "surprise": 1}, ["surprise"]),
        ({"adapters": ["topic", "mood"], "method": "ties", "output_dir": "/tmp/x"}, ["output_dir"]),
        ({"adapters": ["topic", "mood"], "method": "ties", "eval_subset": {"per_task": {"topik": {"max_samples": 2}}}},
         ["eval_subset.per_task: 'topik' is not a task", "topic"]),
    ],
)
def test_invalid_requests_are_422(served, body, fragments) -> None:  # type: ignore[no-untyped-def]
    client, _, artifacts = served
    with nothing_written(client, artifacts):
        _problem(client.post("/merges", json=body), 422, *fragments)
        _problem(client.post("/sweeps", json={**body, "search": {"type": "grid", "grid": {"lambda": [0.5]}}}),
                 422)


def test_malformed_json(served) -> None:  # type: ignore[no-untyped-def]
    client, _, artifacts = served
    with nothing_written(client, artifacts):
        response = client.post("/merges", content=b'{"adapters": [', headers={"content-type": "application/json"})
        _problem(response, 422, "not valid JSON")


def test_nonexistent_adapter_inside_the_roots(served, tiny_workspace) -> None:  # type: ignore[no-untyped-def]
    client, _, artifacts = served
    missing = str(tiny_workspace.parent / "adapters" / "nope")
    with nothing_written(client, artifacts):
        _problem(client.post("/merges", json={"adapters": ["topic", missing], "method": "ties"}), 422,
                 "nor an existing adapter directory")


def test_paths_outside_the_roots_are_403_and_never_opened(served, tiny_workspace, tmp_path) -> None:  # type: ignore[no-untyped-def]
    client, _, artifacts = served
    before = _state(client, artifacts)
    outside = tmp_path / "outside_adapter"
    outside.mkdir()
    (outside / "adapter_config.json").write_text("{not json")  # would be a 422 if it were opened
    link = tiny_workspace.parent / "adapters" / "sneaky_link"
    if not link.exists():
        os.symlink(outside, link)
    for path in (str(outside), str(tiny_workspace.parent / "adapters" / ".." / ".." / outside.name),
                 "../../../../etc", str(link)):
        _problem(client.post("/merges", json={"adapters": ["topic", path], "method": "ties"}), 403,
                 "outside the allowed roots")
    sweep = {"adapters": ["topic", "mood"], "method": "weighted_delta",
             "search": {"type": "grid", "grid": {"lambda": [0.5]}, "warm_start_sweeps": ["/etc"]}}
    _problem(client.post("/sweeps", json=sweep), 403, "warm_start_sweeps")
    assert _state(client, artifacts) == before


def test_oversized_body_is_413(served) -> None:  # type: ignore[no-untyped-def]
    client, _, artifacts = served
    before = _state(client, artifacts)
    body = {"adapters": ["topic", "mood"], "method": "ties", "method_params": {"x": "y" * 10_000}}
    _problem(client.post("/merges", json=body), 413, "exceeds 4096 bytes")

    def chunks():  # type: ignore[no-untyped-def]
        for _ in range(10):
            yield b" " * 1000

    _problem(client.post("/merges", content=chunks(), headers={"content-type": "application/json"}), 413)
    assert _state(client, artifacts) == before


def test_unknown_job_and_cancel_of_a_finished_job(served) -> None:  # type: ignore[no-untyped-def]
    client, _, _ = served
    _problem(client.get("/jobs/does-not-exist"), 404, "not found")
    _problem(client.post("/jobs/does-not-exist/cancel"), 404)
    _problem(client.get("/runs/run_20990101_000000"), 404)
    _problem(client.get("/runs/*"), 404)
    _problem(client.get("/jobs", params={"page_token": "garbage!"}), 422, "page_token")
    job = client.post("/merges", json=MERGE).json()
    wait_job(client, job["id"])
    _problem(client.post(f"/jobs/{job['id']}/cancel"), 409, "already succeeded")
    _problem(client.get("/evaluations", params={"sort": "metric"}), 422, "needs a task")


def test_full_queue_is_429(served) -> None:  # type: ignore[no-untyped-def]
    client, app, _ = served
    with app.state.service.executor.paused():  # the worker takes no job: the queue stays full
        first = client.post("/merges", json=MERGE)
        assert first.status_code == 202
        _problem(client.post("/merges", json=MERGE), 429, "already queued")
    assert wait_job(client, first.json()["id"])["status"] == "succeeded"


def test_auth(tiny_workspace, tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings = Settings(workspace=tiny_workspace, artifacts_dir=tmp_path / "a",
                        token=SecretStr("s3cret"))
    with thread_server(settings) as (client, _):
        _problem(client.post("/merges", json=MERGE), 401, "missing Authorization")
        _problem(client.post("/merges", json=MERGE, headers={"Authorization": "Bearer wrong"}), 403)
        _problem(client.get("/jobs"), 401, "missing Authorization")
        _problem(client.get("/jobs", headers={"Authorization": "Bearer wrong"}), 403, "invalid bearer token")
        ok = client.get("/jobs", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["jobs"] == []  # the refused POSTs queued nothing
        assert client.get("/healthz").status_code == 200  # liveness stays open


def test_models_and_migrations_do_not_drift(tmp_path) -> None:
    env = {**os.environ, "LORA_MERGE_ARTIFACTS_DIR": str(tmp_path),
           "LORA_MERGE_DATABASE_URL": f"sqlite:///{tmp_path / 'check.db'}"}
    from app.db import ALEMBIC_INI

    alembic = [sys.executable, "-m", "alembic", "-c", str(ALEMBIC_INI)]
    subprocess.run([*alembic, "upgrade", "head"], check=True, env=env, cwd=tmp_path)
    check = subprocess.run([*alembic, "check"], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_every_documented_error_is_problem_json(tiny_workspace, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from app.main import create_app

    spec = create_app(Settings(workspace=tiny_workspace, artifacts_dir=tmp_path / "a")).openapi()
    documented = {(method, path, code): set(response.get("content", {}))
                  for path, operations in spec["paths"].items() for method, operation in operations.items()
                  for code, response in operation["responses"].items() if code[0] in "45"}
    assert documented
    odd = {key: types for key, types in documented.items()
           if types != {"application/problem+json"} and key != ("get", "/readyz", "503")}  # health JSON
    assert not odd, odd


def test_every_405_names_what_the_path_allows(served) -> None:  # type: ignore[no-untyped-def]
    """RFC 9110: a 405 carries Allow, listing every method of the path (GET /evaluations and
    POST /evaluations live on different routers)."""
    client, app, _ = served
    for path, item in app.openapi()["paths"].items():
        url = path.replace("{job_id}", "0").replace("{run_id}", "run_20990101_000000")
        documented = {method.upper() for method in item}
        for method in ("TRACE", "PUT", "OPTIONS"):
            answer = client.request(method, url)
            _problem(answer, 405)
            allowed = {m.strip() for m in answer.headers["allow"].split(",")}
            assert allowed - {"HEAD"} == documented, (method, path, allowed)


@pytest.mark.parametrize(
    "body, headers, status, fragment",
    [
        # Shapes the service once answered with a 500.
        ({**MERGE, "params": "x"}, {}, 422, "params must be a mapping"),
        ({**MERGE, "method_params": "x", "params": {"k": 2}}, {}, 422, "method_params must be a mapping"),
        ({**MERGE, "grid": [1]}, {}, 422, "grid must be a mapping"),
        ({**MERGE, "adapters": ["~no_such_user_xyz/a"]}, {}, 422, "not a usable path"),
        ({**MERGE, "adapters": ["./a\u0000b"]}, {}, 422, "not a usable path"),
        (MERGE, {"Idempotency-Key": ""}, 422, "Idempotency-Key"),
        ({**MERGE, "adapters": [""]}, {}, 422, "adapters"),
        ({**MERGE, "optimizer": 0}, {}, 422, "optimizer"),
    ],
)
def test_odd_bodies_are_4xx_never_500(served, body, headers, status, fragment) -> None:  # type: ignore[no-untyped-def]
    client, _, artifacts = served
    with nothing_written(client, artifacts):
        _problem(client.post("/merges", json=body, headers=headers), status, fragment)
