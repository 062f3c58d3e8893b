"""AdaMerging through the real service (uvicorn + httpx): planned at POST, run on the worker.

The request is validated by planning (no optimizer runs on the request thread); the worker
trains the per-layer lambdas on the resident model, streams (step, entropy) progress over SSE,
honours cancellation between steps, and writes `adamerging_lambdas.json` into the run bundle.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.settings import Settings
from tests.service_helpers import thread_server, wait_job

TASKS = ["topic", "mood"]
STEPS = 250


def _adamerging(method: str, steps: int, **extra: Any) -> dict[str, Any]:
    return {"adapters": TASKS, "method": method, "eval_tasks": TASKS,
            "optimizer": {"name": "adamerging",
                          "params": {"steps": steps, "batch_size": 6, "lr": 0.05, **extra}}}


@pytest.fixture(scope="module")
def served(tiny_workspace: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """One service (and worker process) for the module."""
    artifacts = tmp_path_factory.mktemp("adamerging") / "artifacts"
    with thread_server(Settings(workspace=tiny_workspace, artifacts_dir=artifacts)) as (client, app):
        yield client, app, artifacts


def _events(client: httpx.Client, job_id: str) -> list[tuple[str, dict[str, Any]]]:
    """Every server-sent event of a job, from now until it ends."""
    events, name = [], ""
    with client.stream("GET", f"/jobs/{job_id}/events", timeout=120) as stream:
        for line in stream.iter_lines():
            if line.startswith("event:"):
                name = line.removeprefix("event:").strip()
            elif line.startswith("data:"):
                events.append((name, json.loads(line.removeprefix("data:").strip())))
    return events


@pytest.mark.parametrize("method", ["task_vector", "weighted_delta"])
def test_adamerging_end_to_end_through_the_service(served, method: str) -> None:  # type: ignore[no-untyped-def]
    """`weighted_delta` needs no lambda: the optimizer sets the lambdas."""
    client, app, _ = served
    worker = app.state.service.executor
    before = worker.inspect()
    # Long enough (a few seconds) for the events' 0.5 s polls to see training progress.
    answer = client.post("/merges", json=_adamerging(method, steps=STEPS))
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["id"]
    events = _events(client, job_id)
    job = wait_job(client, job_id)
    assert job["status"] == "succeeded", job["error"]

    progress = [data["message"] for name, data in events if name == "progress"]
    entropy = [m for m in progress if m.startswith("adamerging step") and "entropy" in m]
    assert entropy, progress  # (step, entropy) reached the client over SSE
    assert events[-1][0] == "end"

    result = job["result"]
    assert result["optimizer"]["name"] == "adamerging" and result["optimizer"]["steps"] == STEPS
    run_dir = Path(result["run_dir"])
    learned = json.loads((run_dir / "adamerging_lambdas.json").read_text())
    assert learned["tasks"] == TASKS and len(learned["entropy"]) == STEPS
    curve = learned["entropy"]  # minimised: lower at the end (means over 25 random batches)
    assert sum(curve[-25:]) < sum(curve[:25])
    assert result["optimizer"]["final_entropy"] == curve[-1]
    assert (run_dir / "adamerging_entropy.png").read_bytes()[:4] == b"\x89PNG"
    metadata = json.loads((run_dir / "merge_metadata.json").read_text())
    assert metadata["lambda_policy"]["type"] == "per_layer"
    assert metadata["optimizer"]["name"] == "adamerging"
    assert set(result["evaluation"]["metrics"]) == set(TASKS)
    after = worker.inspect()  # the worker's model: weights, gradient flags and hooks as before
    assert after == before and after["requires_grad"] and after["hooks"] == 0


def test_adamerging_through_the_service_is_cancellable_between_steps(served) -> None:  # type: ignore[no-untyped-def]
    client, app, artifacts = served
    runs = set(artifacts.glob("merged/*/*/runs/run_*"))
    worker = app.state.service.executor
    before = worker.inspect()
    job_id = client.post("/merges", json=_adamerging("task_vector", steps=100_000)).json()["id"]
    deadline = time.monotonic() + 60
    while "entropy" not in client.get(f"/jobs/{job_id}").json()["progress"]["message"]:
        assert time.monotonic() < deadline, "no AdaMerging step was reported"
        time.sleep(0.05)
    assert client.post(f"/jobs/{job_id}/cancel").status_code == 200
    job = wait_job(client, job_id, timeout=60)
    assert job["status"] == "cancelled"
    assert worker.inspect() == before
    assert set(artifacts.glob("merged/*/*/runs/run_*")) == runs  # no run bundle was left


def test_adamerging_requests_that_cannot_run_are_refused_at_post(served) -> None:  # type: ignore[no-untyped-def]
    client, _, _ = served
    jobs = client.get("/jobs", params={"limit": 200}).json()["jobs"]
    ties = client.post("/merges", json=_adamerging("ties", steps=2))
    assert ties.status_code == 422
    assert "use method task_vector or weighted_delta, not 'ties'" in ties.json()["detail"]
    sweep = client.post("/sweeps", json={**_adamerging("task_vector", steps=2),
                                         "search": {"type": "grid", "grid": {"lambda": [0.5]}}})
    assert sweep.status_code == 422 and "optimizer" in sweep.json()["detail"]
    assert client.get("/jobs", params={"limit": 200}).json()["jobs"] == jobs  # none created
