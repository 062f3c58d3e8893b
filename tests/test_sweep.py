"""Sweeps on the tiny workspace: reproducible bayes, warm start, resume after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from merging_core.config import parse_merge_config
from merging_core.errors import Cancelled, ConfigError, ParamError
from merging_core.runtime.cancel import CancelToken
from merging_core.runtime.index import read_index
from merging_core.search import plan_sweep, run_sweep


def _config(**search):  # type: ignore[no-untyped-def]
    base = {"type": "bayes", "budget": 5, "init_points": 3, "seed": 7,
            "space": {"lambda": {"min": 0.0, "max": 1.0}}}
    return parse_merge_config({
        "adapters": ["topic", "mood"], "method": "weighted_delta",
        "eval_subset": {"max_samples": 12, "stratified": True},
        "search": {**base, **search},
    })


def test_bayes_sweep_with_a_fixed_seed_is_reproducible(tiny_session_factory, tmp_path) -> None:
    first = run_sweep(_config(), tiny_session_factory(tmp_path / "a"))
    second = run_sweep(_config(), tiny_session_factory(tmp_path / "b"))
    assert [t.point for t in first.trials] == [t.point for t in second.trials]
    assert [t.objective for t in first.trials] == [t.objective for t in second.trials]
    assert [t.source for t in first.trials] == ["sobol"] * 3 + ["gp"] * 2
    summary = json.loads(first.summary_path.read_text())
    assert summary["complete"] and summary["num_trials"] == 5
    assert summary["best"]["objective"] == max(t.objective for t in first.trials)
    objectives = [t["objective"] for t in summary["trials"]]
    assert objectives == sorted(objectives, reverse=True)
    assert set(summary["trials"][0]["metrics"]) == {"topic", "mood"}
    assert first.plot_path is not None and first.plot_path.read_bytes()[:4] == b"\x89PNG"
    index = read_index(first.summary_path.parent.parent / "eval" / "index.json")
    assert sorted(e["trial"] for e in index) == [0, 1, 2, 3, 4]


def test_grid_sweep_and_per_adapter_space(tiny_session_factory, tmp_path) -> None:
    session = tiny_session_factory(tmp_path)
    grid = parse_merge_config({
        "adapters": ["topic", "mood"], "method": "task_vector", "eval_subset": {"max_samples": 8},
        "search": {"type": "grid", "grid": {"lambda": [0.5, [1.0, 0.2]]}},
    })
    result = run_sweep(grid, session)
    assert [t.point for t in result.trials] == [{"lambda": 0.5}, {"lambda": [1.0, 0.2]}]
    per_adapter = parse_merge_config({
        "adapters": ["topic", "mood"], "method": "task_vector", "eval_subset": {"max_samples": 8},
        "search": {"type": "bayes", "budget": 2, "init_points": 2,
                   "space": {"lambda": {"min": -1, "max": 1, "per_adapter": True}}},
    })
    trials = run_sweep(per_adapter, session).trials
    assert all(set(t.point) == {"lambda[0]", "lambda[1]"} for t in trials)
    assert all(0.0 <= v <= 1.0 for t in trials for v in t.point.values())  # nonnegative constraint
    assert all(isinstance(t.method_params["lambda"], list) for t in trials)


def test_per_layer_space(tiny_session_factory, tmp_path) -> None:
    config = parse_merge_config({
        "adapters": ["topic", "mood"], "method": "task_vector", "eval_subset": {"max_samples": 8},
        "search": {"type": "bayes", "budget": 2, "init_points": 2,
                   "space": {"lambda": {"min": 0, "max": 2, "per_layer": [0, 1]}}},
    })
    trials = run_sweep(config, tiny_session_factory(tmp_path)).trials
    assert set(trials[0].lambda_policy["overrides"]) == {"0", "1"}


def test_bad_sweeps_fail_before_any_trial(tiny_session_factory, tmp_path) -> None:
    session = tiny_session_factory(tmp_path)
    with pytest.raises(ParamError, match="search.space.density: method 'weighted_delta' has no such"):
        plan_sweep(_config(space={"density": {"min": 0.1, "max": 0.9}}), session.workspace)
    with pytest.raises(ConfigError, match="unknown task 'asr'"):
        plan_sweep(parse_merge_config({**_config().model_dump(exclude_unset=True), "eval_tasks": ["asr"]}),
                   session.workspace)
    assert not (tmp_path / "merged").exists()


def test_warm_start_skips_mismatches_and_reuses_without_evaluating(tiny_session_factory, tmp_path) -> None:
    session = tiny_session_factory(tmp_path)
    earlier = run_sweep(_config(budget=3, init_points=3), session)
    other = parse_merge_config({
        "adapters": ["topic", "mood"], "method": "weighted_delta", "split": "train",
        "eval_subset": {"max_samples": 12, "stratified": True},
        "search": {"type": "bayes", "budget": 2, "init_points": 2, "seed": 1,
                   "space": {"lambda": {"min": 0.0, "max": 1.0}}},
    })
    mismatched = run_sweep(other, session)
    evaluations = []
    original = session.evaluate_merge
    session.evaluate_merge = lambda *a, **k: evaluations.append(1) or original(*a, **k)  # type: ignore[method-assign]
    warm = run_sweep(
        _config(budget=5, init_points=3, seed=8,
                warm_start_sweeps=[str(earlier.summary_path.parent)], warm_start_max_points=10),
        session,
    )
    assert warm.warm_start["used"] == 3
    reasons = [s["reason"] for s in warm.warm_start["skipped"]]
    assert any("split" in r for r in reasons), reasons
    assert str(mismatched.summary_path) in [s["source"] for s in warm.warm_start["skipped"]]
    # 3 warm points already cover init_points: no Sobol trial, only GP trials are evaluated.
    assert [t.source for t in warm.trials] == ["gp"] * 5
    assert len(evaluations) == 5
    # A grid sweep whose points were all evaluated before re-evaluates nothing.
    grid_points = [t.point["lambda"] for t in earlier.trials]
    evaluations.clear()
    grid = run_sweep(
        parse_merge_config({**_config().model_dump(exclude_unset=True),
                            "search": {"type": "grid", "grid": {"lambda": grid_points},
                                       "warm_start_sweeps": [str(earlier.summary_path)]}}),
        session,
    )
    assert evaluations == [] and {t.source for t in grid.trials} == {"warm_start"}


def test_cancel_between_trials_restores_weights(tiny_session_factory, tmp_path) -> None:
    session = tiny_session_factory(tmp_path)
    before = session.holder.weights_fingerprint()
    cancel = CancelToken()
    with pytest.raises(Cancelled):
        run_sweep(_config(), session, cancel=cancel,
                  progress=lambda done, total, message, extra: cancel.cancel() if done >= 2 else None)
    after = session.holder.weights_fingerprint()
    assert all((before[k] == after[k]).all() for k in before)


SWEEP_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from merging_core.config import parse_merge_config
    from merging_core.evaluation.evaluate import EvalSession
    from merging_core.search import run_sweep
    from merging_core.evaluation.workspace import load_workspace
    config = parse_merge_config({
        "adapters": ["topic", "mood"], "method": "weighted_delta",
        "eval_subset": {"max_samples": 12, "stratified": True},
        "search": {"type": "bayes", "budget": 6, "init_points": 3, "seed": 7,
                   "space": {"lambda": {"min": 0.0, "max": 1.0}}},
    })
    session = EvalSession.from_workspace(load_workspace(sys.argv[1]), sys.argv[2])
    slow = float(sys.argv[3])
    run_sweep(config, session, progress=lambda *a: time.sleep(slow))
    """
)


def test_killed_sweep_resumes_without_rerunning_finished_trials(tiny_workspace, tiny_session_factory, tmp_path) -> None:
    artifacts = tmp_path / "artifacts"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-c", SWEEP_SCRIPT, str(tiny_workspace), str(artifacts), "2.0"], env=env
    )
    trials_glob = "merged/weighted_delta/mood_topic/sweeps/sweep_*/trials/trial_*.json"
    deadline = time.monotonic() + 240
    while len(list(artifacts.glob(trials_glob))) < 2 and time.monotonic() < deadline:
        assert process.poll() is None, "the sweep process ended early"
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    finished = {p.name: p.read_bytes() for p in artifacts.glob(trials_glob)}
    assert 2 <= len(finished) < 6

    session = tiny_session_factory(artifacts)
    evaluated = []
    original = session.evaluate_merge
    session.evaluate_merge = lambda *a, **k: evaluated.append(1) or original(*a, **k)  # type: ignore[method-assign]
    resumed = run_sweep(_config(budget=6), session)
    assert resumed.resumed_trials == len(finished)
    assert len(evaluated) == 6 - len(finished)
    for path in artifacts.glob(trials_glob):
        if path.name in finished:
            assert path.read_bytes() == finished[path.name]  # not re-run
    index = read_index(resumed.summary_path.parent.parent / "eval" / "index.json")
    ids = [e["id"] for e in index]
    assert len(ids) == len(set(ids)) == 6
    fresh = run_sweep(_config(budget=6), tiny_session_factory(tmp_path / "fresh"))
    assert resumed.best.point == fresh.best.point
