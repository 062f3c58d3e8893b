"""Sweep warm start (per-field matching, directory/glob sources, the point cap) and the
`ei` / `logei` acquisitions, on the tiny workspace."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from merging_core.config import parse_merge_config
from merging_core.search import SweepResult, run_sweep

SUBSET = {"max_samples": 8}


def _config(search: dict[str, Any], **overrides: Any):  # type: ignore[no-untyped-def]
    data: dict[str, Any] = {
        "adapters": ["topic", "mood"], "method": "weighted_delta", "eval_subset": SUBSET,
        "search": search,
    }
    data.update(overrides)
    return parse_merge_config(data)


def _grid(values: list[Any], **search: Any) -> dict[str, Any]:
    return {"type": "grid", "grid": {"lambda": values}, **search}


def _bayes(**search: Any) -> dict[str, Any]:
    return {"type": "bayes", "budget": 1, "init_points": 1, "seed": 3,
            "space": {"lambda": {"min": 0.0, "max": 1.0}}, **search}


def _count_evaluations(session) -> list[int]:  # type: ignore[no-untyped-def]
    evaluations: list[int] = []
    original = session.evaluate_merge
    session.evaluate_merge = lambda *a, **k: evaluations.append(1) or original(*a, **k)  # type: ignore[method-assign]
    return evaluations


def _sources(result: SweepResult) -> dict[Any, str]:
    return {json.dumps(t.point["lambda"]): t.source for t in result.trials}


# --- which sources match ------------------------------------------------------------------


# Each source differs from the target in exactly one field of the warm-start context, and
# evaluated a lambda of its own, which the target's grid also holds: a wrongly reused source
# would show up as a "warm_start" trial there.
MISMATCHES: dict[str, tuple[float, dict[str, Any]]] = {
    "method": (0.11, {"method": "task_vector"}),
    "adapters": (0.22, {"adapters": ["mood", "topic"], "eval_tasks": ["topic", "mood"]}),
    "merge_mode": (0.33, {"merge_mode": "strict"}),
    "split": (0.44, {"split": "train"}),
    "eval_tasks": (0.55, {"eval_tasks": ["topic"]}),
    "constraint_nonnegative": (0.66, {"constraint_nonnegative": False}),
    "eval_subset": (0.77, {"eval_subset": {"max_samples": 6}}),
}


def test_warm_start_skips_each_mismatching_field_and_reuses_a_match(tiny_session_factory, tmp_path) -> None:
    session = tiny_session_factory(tmp_path)
    sources: dict[str, Path] = {}
    for field, (value, overrides) in MISMATCHES.items():
        sources[field] = run_sweep(_config(_grid([value]), **overrides), session).summary_path
    matching = run_sweep(_config(_grid([0.9])), session)
    assert len({*sources.values(), matching.summary_path}) == len(MISMATCHES) + 1

    evaluations = _count_evaluations(session)
    values = [0.9] + [value for value, _ in MISMATCHES.values()]
    warm = run_sweep(
        _config(_grid(values, warm_start_sweeps=[*map(str, sources.values()), str(matching.summary_path)])),
        session,
    )
    assert warm.warm_start["used"] == 1
    assert {s["source"]: s["reason"] for s in warm.warm_start["skipped"]} == {
        str(path): f"{field} differ" for field, path in sources.items()
    }
    assert _sources(warm) == {"0.9": "warm_start", **{json.dumps(v): "grid" for v, _ in MISMATCHES.values()}}
    assert len(evaluations) == len(MISMATCHES)  # the matching point was not evaluated again
    reused, = (t for t in warm.trials if t.source == "warm_start")
    original, = matching.trials
    assert reused.index == 0
    assert (reused.objective, reused.metrics, reused.eval_id) == (original.objective, original.metrics, original.eval_id)
    summary = json.loads(warm.summary_path.read_text())
    assert summary["warm_start"] == warm.warm_start
    on_disk = json.loads((warm.summary_path.parent / warm.sweep_id / "trials" / "trial_0000.json").read_text())
    assert on_disk["source"] == "warm_start"


def test_a_mismatch_in_several_fields_names_them_all(tiny_session_factory, tmp_path) -> None:
    session = tiny_session_factory(tmp_path)
    source = run_sweep(_config(_grid([0.5]), split="train", merge_mode="strict"), session)
    warm = run_sweep(_config(_grid([0.5], warm_start_sweeps=[str(source.summary_path)])), session)
    assert warm.warm_start == {"used": 0, "skipped": [
        {"source": str(source.summary_path), "reason": "merge_mode, split differ"}
    ]}
    assert [t.source for t in warm.trials] == ["grid"]


# --- where sources are found --------------------------------------------------------------


def test_warm_start_sources_as_a_directory_and_as_a_glob(tiny_session_factory, tmp_path) -> None:
    sources = tiny_session_factory(tmp_path / "sources")
    first = run_sweep(_config(_grid([0.3])), sources)
    second = run_sweep(_config(_grid([0.6])), sources)
    other_method = run_sweep(_config(_grid([0.3]), method="task_vector"), sources)
    sweeps_dir = first.summary_path.parent
    assert second.summary_path.parent == sweeps_dir != other_method.summary_path.parent
    (sweeps_dir / "notes.json").write_text("{}")  # not a sweep_*.json: never read
    target = _grid([0.3, 0.6])

    # A directory: every sweep_*.json in it (not its trial folders, plots or other JSON).
    by_dir = tiny_session_factory(tmp_path / "by_dir")
    evaluations = _count_evaluations(by_dir)
    result = run_sweep(_config({**target, "warm_start_sweeps": [str(sweeps_dir)]}), by_dir)
    assert result.warm_start == {"used": 2, "skipped": []}
    assert _sources(result) == {"0.3": "warm_start", "0.6": "warm_start"}
    assert evaluations == []

    # A glob across methods: the task_vector sweep is found, and skipped for its method.
    by_glob = tiny_session_factory(tmp_path / "by_glob")
    evaluations = _count_evaluations(by_glob)
    pattern = str(tmp_path / "sources" / "merged" / "*" / "*" / "sweeps" / "sweep_*.json")
    missing = str(tmp_path / "nowhere" / "sweep_*.json")
    result = run_sweep(_config({**target, "warm_start_sweeps": [pattern, missing]}), by_glob)
    assert result.warm_start == {"used": 2, "skipped": [
        {"source": str(other_method.summary_path), "reason": "method differ"},
        {"source": missing, "reason": "no sweep_*.json found"},
    ]}
    assert _sources(result) == {"0.3": "warm_start", "0.6": "warm_start"}
    assert evaluations == []


# --- the cap ------------------------------------------------------------------------------


def test_warm_start_max_points_caps_the_points_used(tiny_session_factory, tmp_path) -> None:
    source = run_sweep(_config(_grid([0.2, 0.4, 0.6])), tiny_session_factory(tmp_path / "source"))
    ranked = json.loads(source.summary_path.read_text())["trials"]
    warm = [str(source.summary_path)]

    # Grid (in another order: the very same sweep would be this one, not a source): the first
    # two points of the ranked source are reused, the third is evaluated.
    session = tiny_session_factory(tmp_path / "cap2")
    evaluations = _count_evaluations(session)
    result = run_sweep(_config(_grid([0.6, 0.4, 0.2], warm_start_sweeps=warm, warm_start_max_points=2)), session)
    assert result.warm_start == {"used": 2, "skipped": [
        {"source": f"{source.summary_path}#trial{ranked[2]['index']}",
         "reason": "warm_start_max_points=2 reached"},
    ]}
    assert _sources(result) == {
        json.dumps(ranked[0]["point"]["lambda"]): "warm_start",
        json.dumps(ranked[1]["point"]["lambda"]): "warm_start",
        json.dumps(ranked[2]["point"]["lambda"]): "grid",
    }
    assert len(evaluations) == 1

    # A cap of 0 uses nothing.
    session = tiny_session_factory(tmp_path / "cap0")
    evaluations = _count_evaluations(session)
    result = run_sweep(_config(_grid([0.6, 0.4, 0.2], warm_start_sweeps=warm, warm_start_max_points=0)), session)
    assert result.warm_start["used"] == 0
    assert [s["reason"] for s in result.warm_start["skipped"]] == ["warm_start_max_points=0 reached"] * 3
    assert {t.source for t in result.trials} == {"grid"} and len(evaluations) == 3

    # Bayes: warm points count towards init_points, so the cap decides how many Sobol points
    # are still drawn (init_points=3: two warm points leave one Sobol trial, three leave none).
    capped = run_sweep(
        _config(_bayes(init_points=3, warm_start_sweeps=warm, warm_start_max_points=2)),
        tiny_session_factory(tmp_path / "bayes2"),
    )
    assert capped.warm_start["used"] == 2 and [t.source for t in capped.trials] == ["sobol"]
    uncapped = run_sweep(
        _config(_bayes(init_points=3, warm_start_sweeps=warm)), tiny_session_factory(tmp_path / "bayes_all")
    )
    assert uncapped.warm_start == {"used": 3, "skipped": []}
    assert [t.source for t in uncapped.trials] == ["gp"]


# --- acquisitions -------------------------------------------------------------------------


@pytest.fixture
def built_acquisitions(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Which botorch acquisition classes the sweep constructs."""
    import botorch.acquisition
    import botorch.acquisition.logei

    built: list[str] = []

    def spy(module: Any, name: str) -> None:
        real = getattr(module, name)
        monkeypatch.setattr(module, name, type(name, (real,), {
            "__init__": lambda self, *a, **k: built.append(name) or real.__init__(self, *a, **k)
        }))

    spy(botorch.acquisition, "ExpectedImprovement")
    spy(botorch.acquisition, "LogExpectedImprovement")
    spy(botorch.acquisition.logei, "qLogNoisyExpectedImprovement")
    return built


@pytest.mark.parametrize(("acquisition", "cls"), [("ei", "ExpectedImprovement"), ("logei", "LogExpectedImprovement")])
def test_ei_and_logei_sweeps_are_reproducible(
    acquisition, cls, built_acquisitions, tiny_session_factory, tmp_path
) -> None:
    search = _bayes(budget=4, init_points=2, seed=5, acquisition=acquisition)
    first = run_sweep(_config(search), tiny_session_factory(tmp_path / "a"))
    second = run_sweep(_config(search), tiny_session_factory(tmp_path / "b"))
    assert built_acquisitions == [cls] * 4  # two GP trials per sweep, with this acquisition only
    assert [t.source for t in first.trials] == ["sobol", "sobol", "gp", "gp"]
    assert [t.point for t in first.trials] == [t.point for t in second.trials]
    assert [t.objective for t in first.trials] == [t.objective for t in second.trials]
    assert all(0.0 <= t.point["lambda"] <= 1.0 for t in first.trials)
    assert json.loads(first.summary_path.read_text())["search"]["acquisition"] == acquisition


def test_the_acquisition_changes_only_the_gp_proposals(built_acquisitions, tiny_session_factory, tmp_path) -> None:
    """Same seed, other acquisition: the same Sobol points, and another sweep (no resume)."""
    session = tiny_session_factory(tmp_path)
    ei = run_sweep(_config(_bayes(budget=3, init_points=2, acquisition="ei")), session)
    logei = run_sweep(_config(_bayes(budget=3, init_points=2, acquisition="logei")), session)
    assert ei.sweep_id != logei.sweep_id and logei.resumed_trials == 0
    assert [t.point for t in ei.trials[:2]] == [t.point for t in logei.trials[:2]]
    assert [t.objective for t in ei.trials[:2]] == [t.objective for t in logei.trials[:2]]
    assert built_acquisitions == ["ExpectedImprovement", "LogExpectedImprovement"]


# --- regressions ---------------------------------------------------------------------------


def test_warm_start_from_a_grid_with_per_adapter_values_skips_them(tiny_session_factory, tmp_path) -> None:
    session = tiny_session_factory(tmp_path)
    source = run_sweep(_config(_grid([0.5, [1.0, 0.2]])), session)
    warm = run_sweep(_config(_bayes(init_points=2, warm_start_sweeps=[str(source.summary_path)])), session)
    assert warm.warm_start["used"] == 1
    assert len(warm.warm_start["skipped"]) == 1
    assert "not a single number" in warm.warm_start["skipped"][0]["reason"]


def test_the_same_sweep_from_another_artifacts_dir_is_used_or_reported(tiny_session_factory, tmp_path) -> None:
    source = run_sweep(_config(_grid([0.5])), tiny_session_factory(tmp_path / "elsewhere"))
    warm = run_sweep(
        _config(_grid([0.5], warm_start_sweeps=[str(source.summary_path)])), tiny_session_factory(tmp_path / "here")
    )
    assert warm.sweep_id == source.sweep_id
    assert warm.warm_start == {"used": 1, "skipped": []}
    assert [t.source for t in warm.trials] == ["warm_start"]


def test_a_file_named_twice_is_read_once_and_off_grid_points_do_not_count(tiny_session_factory, tmp_path) -> None:
    session = tiny_session_factory(tmp_path)
    source = run_sweep(_config(_grid([0.5])), session)
    sources = [str(source.summary_path), str(source.summary_path.parent)]
    again = run_sweep(_config(_grid([0.5, 0.9], warm_start_sweeps=sources)), session)
    assert again.warm_start == {"used": 1, "skipped": []}
    off_grid = run_sweep(_config(_grid([0.7], warm_start_sweeps=sources)), session)
    assert off_grid.warm_start["used"] == 0 and [t.source for t in off_grid.trials] == ["grid"]
