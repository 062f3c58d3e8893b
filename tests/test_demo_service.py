"""The demo workspace driven through the HTTP API (real uvicorn, httpx, the real MiniLM model)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from app.settings import DEMO_WORKSPACE, Settings
from tests.service_helpers import thread_server, wait_job

TASKS = ["intent", "banking", "sentiment"]


def recorded_accuracies() -> dict[str, float]:
    """The per-adapter test accuracies recorded in the demo workspace's README."""
    text = (DEMO_WORKSPACE.parent / "README.md").read_text()
    found = dict(re.findall(r"^\| `?(\w+)`? adapter \| ([0-9.]+) \|", text, flags=re.MULTILINE))
    return {task: float(value) for task, value in found.items()}


def test_demo_workspace_over_http(tmp_path: Path) -> None:
    recorded = recorded_accuracies()
    assert set(recorded) == set(TASKS)
    settings = Settings(workspace=DEMO_WORKSPACE, artifacts_dir=tmp_path / "artifacts", device="cpu")
    with thread_server(settings) as (client, _):
        merge = client.post("/merges", json={
            "adapters": TASKS, "method": "ties", "method_params": {"k": 20, "lambda": 1.0},
            "eval_tasks": TASKS, "save_merged": True,
        })
        assert merge.status_code == 202
        sweep = client.post("/sweeps", json={
            "adapters": ["intent", "sentiment"], "method": "weighted_delta",
            "eval_subset": {"max_samples": 50, "stratified": True},
            "search": {"type": "bayes", "budget": 6, "init_points": 3, "seed": 0,
                       "space": {"lambda": {"min": 0.0, "max": 1.0}}},
        })
        merged = wait_job(client, merge.json()["id"], timeout=900)
        assert merged["status"] == "succeeded", merged["error"]
        evaluation = merged["result"]["evaluation"]
        assert set(evaluation["metrics"]) == set(TASKS)
        for task in TASKS:
            reference = evaluation["tasks"][task]["reference"]["primary"]
            assert reference == pytest.approx(recorded[task], abs=5e-5), task
        tasks = {t["name"]: t for t in client.get("/tasks").json()}
        for task in TASKS:
            assert tasks[task]["reference"]["test"]["primary"] == pytest.approx(recorded[task], abs=5e-5)
        swept = wait_job(client, sweep.json()["id"], timeout=900)
        assert swept["status"] == "succeeded", swept["error"]
        trials = client.get(f"/sweeps/{swept['id']}/trials").json()
        assert len(trials["trials"]) >= 6
        assert trials["best"]["objective"] == max(t["objective"] for t in trials["trials"])
