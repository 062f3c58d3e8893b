"""`optimizer: bayes` on a direct merge: a short Bayesian search through the sweep machinery,
then the merge with its best point, recorded in the run bundle; in the library and through the
service."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from merging_core import run_merge
from merging_core.errors import ParamError
from merging_core.runtime.paths import RUN_METADATA_FILE

SEARCH = {"budget": 3, "init_points": 2, "seed": 0, "search_subset": {"max_samples": 8, "stratified": True},
          "split": "test"}


def test_bayes_merges_with_the_best_trial_and_records_the_search(tiny_session_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    session = tiny_session_factory(tmp_path)
    result = run_merge({"adapters": ["topic", "mood"], "method": "weighted_delta",
                        "optimizer": {"name": "bayes", "params": SEARCH}},
                       task_registry=session.workspace.task_registry(), artifacts_dir=session.root,
                       session=session)
    search = json.loads((result.run_dir / "bayes_trials.json").read_text())
    assert len(search["trials"]) == 3
    best = max(search["trials"], key=lambda t: t["objective"])
    assert search["best_index"] == best["index"]
    # The merge uses the best trial's weights (one per adapter, from the default space).
    assert result.params["lambda"] == pytest.approx(best["method_params"]["lambda"])
    assert result.output.params["lambda"] == pytest.approx(best["method_params"]["lambda"])
    assert (result.run_dir / "bayes_search.png").read_bytes()[:4] == b"\x89PNG"
    metadata = json.loads((result.run_dir / RUN_METADATA_FILE).read_text())
    assert metadata["optimizer"]["name"] == "bayes"
    assert metadata["optimizer"]["summary"]["sweep_id"] == search["sweep_id"]
    assert metadata["params"]["lambda"] == pytest.approx(best["method_params"]["lambda"])
    # The same request again resumes the persisted search instead of scoring anything again.
    again = run_merge({"adapters": ["topic", "mood"], "method": "weighted_delta",
                       "optimizer": {"name": "bayes", "params": SEARCH}},
                      task_registry=session.workspace.task_registry(), artifacts_dir=session.root,
                      session=session)
    assert again.params["lambda"] == result.params["lambda"]


def test_bayes_needs_a_workspace_and_valid_settings(tiny_workspace: Path, tmp_path: Path) -> None:
    from merging_core.evaluation.workspace import load_workspace

    registry = load_workspace(tiny_workspace).task_registry()
    with pytest.raises(ParamError, match="optimizer 'bayes' scores merges on the workspace's tasks"):
        run_merge({"adapters": ["topic", "mood"], "method": "weighted_delta", "optimizer": "bayes"},
                  task_registry=registry, artifacts_dir=tmp_path)
    with pytest.raises(ParamError, match="init_points must not exceed budget"):
        run_merge({"adapters": ["topic", "mood"], "method": "weighted_delta",
                   "optimizer": {"name": "bayes", "params": {"budget": 2, "init_points": 3}}},
                  task_registry=registry, artifacts_dir=tmp_path)


def test_bayes_through_the_service(tiny_workspace: Path, tmp_path: Path) -> None:
    from app.settings import Settings
    from tests.service_helpers import thread_server, wait_job

    with thread_server(Settings(workspace=tiny_workspace, artifacts_dir=tmp_path / "artifacts")) as (client, _):
        bad = client.post("/merges", json={"adapters": ["topic", "mood"], "method": "weighted_delta",
                                           "optimizer": {"name": "bayes", "params": {"space": {"lambda": 3}}}})
        assert bad.status_code == 422 and bad.headers["content-type"].startswith("application/problem+json")
        assert "space" in bad.json()["detail"]
        job = client.post("/merges", json={"adapters": ["topic", "mood"], "method": "weighted_delta",
                                           "eval_tasks": ["topic", "mood"],
                                           "eval_subset": {"max_samples": 8, "stratified": True},
                                           "optimizer": {"name": "bayes", "params": SEARCH}})
        assert job.status_code == 202, job.text
        done = wait_job(client, job.json()["id"])
        assert done["status"] == "succeeded", done["error"]
        run_dir = Path(done["run_dir"])
        search = json.loads((run_dir / "bayes_trials.json").read_text())
        best = max(search["trials"], key=lambda t: t["objective"])
        metadata = json.loads((run_dir / RUN_METADATA_FILE).read_text())
        assert metadata["params"]["lambda"] == pytest.approx(best["method_params"]["lambda"])
        assert done["result"]["merge_tag"] == metadata["merge_tag"]
        assert set(done["result"]["evaluation"]["metrics"]) == {"topic", "mood"}
