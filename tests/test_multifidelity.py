"""Multi-fidelity sweeps (`search.multi_fidelity`): successive halving over eval-subset sizes.

Nested subsets (prefixes of one fixed order), the bracket schedule and its promotions, ranking
at the top fidelity only, resume after an interruption, warm start across plain and
multi-fidelity sweeps, refused configs, and one real HTTP service. Real sweeps on the tiny
workspace (tests/conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from app.settings import Settings
from merging_core.config import parse_merge_config
from merging_core.errors import Cancelled, ConfigError
from merging_core.evaluation.data import TaskData
from merging_core.evaluation.subsets import (
    FidelitySubsetConfig,
    SubsetSpec,
    select_indices,
    subset_namespace,
    subset_order,
)
from merging_core.runtime.cancel import CancelToken
from merging_core.runtime.index import read_index
from merging_core.runtime.paths import trial_file
from merging_core.search import Sweep, plan_sweep, run_sweep
from merging_core.search.trials import Trial
from tests.service_helpers import thread_server, wait_job

FIDELITIES = [6, 12, 24]
ETA = 2
RUNGS = [4, 2, 1]  # eta^2, eta, 1 trials per fidelity in one bracket
BRACKET = sum(RUNGS)


def _body(**search: Any) -> dict[str, Any]:
    base = {"type": "bayes", "budget": 2 * BRACKET, "init_points": 4, "seed": 3,
            "space": {"lambda": {"min": -4.0, "max": 4.0, "per_adapter": True}},
            "multi_fidelity": {"fidelities": FIDELITIES, "eta": ETA}}
    return {"adapters": ["topic", "mood"], "method": "task_vector", "constraint_nonnegative": False,
            "eval_subset": {"max_samples": 24, "stratified": True},
            "search": {**base, **search}}


def _config(**search: Any):  # type: ignore[no-untyped-def]
    return parse_merge_config(_body(**search))


def _count_evaluations(session) -> list[int]:  # type: ignore[no-untyped-def]
    evaluations: list[int] = []
    original = session.evaluate_merge
    session.evaluate_merge = lambda *a, **k: evaluations.append(1) or original(*a, **k)  # type: ignore[method-assign]
    return evaluations


def _expected_fidelities(n_trials: int) -> list[int]:
    per_bracket = [f for f, n in zip(FIDELITIES, RUNGS) for _ in range(n)]
    return [per_bracket[i % BRACKET] for i in range(n_trials)]


@pytest.fixture(scope="module")
def fresh_artifacts(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    return tmp_path_factory.mktemp("fresh")


@pytest.fixture(scope="module")
def fresh(tiny_session_factory, fresh_artifacts):  # type: ignore[no-untyped-def]
    """One uninterrupted two-bracket sweep, the reference for the others."""
    return run_sweep(_config(), tiny_session_factory(fresh_artifacts))


# --- nested subsets --------------------------------------------------------------------------


def test_fidelity_subsets_are_prefixes_of_one_order_where_plain_stratified_ones_are_not() -> None:
    labels = [f"label{i}" for i, n in enumerate([16, 13, 10, 16]) for _ in range(n)]
    data = TaskData(texts=[str(i) for i in range(len(labels))], labels=labels)
    plain = {n: set(select_indices(data, SubsetSpec(0, True, True, n), "t/test")) for n in (18, 19)}
    # Largest remainders give label2 4 rows of 18 but 3 of 19: plain sizes are not nested.
    assert not plain[18] <= plain[19]

    top = SubsetSpec(0, True, True, 40)
    order = subset_order(data, top, "t/test")
    assert sorted(order) == select_indices(data, top, "t/test")  # the whole order is the plain subset
    previous: set[int] = set()
    for size in range(1, 41):
        rows = set(select_indices(data, SubsetSpec(0, True, True, 40, fidelity=size), "t/test"))
        assert len(rows) == size and previous <= rows
        previous = rows
    # Near-proportional at every prefix (Sainte-Lague): 10 of 55 rows -> label shares 16:13:10:16.
    ten = [labels[i] for i in order[:10]]
    assert [ten.count(f"label{i}") for i in range(4)] == [3, 2, 2, 3]
    # Plain subsets keep their tags (and so their cached indices and results directories).
    assert top.tag == "subset_n40_seed0_shuf_strat"
    assert SubsetSpec(0, True, True, 40, fidelity=10).tag == "subset_n10of40_seed0_shuf_strat"
    config = FidelitySubsetConfig(max_samples=40, stratified=True, fidelity=10)
    assert subset_namespace(config).startswith("subset_n10of40_seed0_")


# --- the schedule, promotions and ranking ----------------------------------------------------


def test_sweep_promotes_the_best_1_over_eta_and_ranks_at_the_top_fidelity(fresh, tiny_session_factory) -> None:
    trials: list[Trial] = fresh.trials
    assert len(trials) == 2 * BRACKET
    assert [t.fidelity for t in trials] == _expected_fidelities(len(trials))
    assert [t.source for t in trials[:BRACKET]] == ["sobol"] * BRACKET  # nothing modelled yet
    assert [t.source for t in trials[BRACKET:]] == ["gp"] * BRACKET  # GP on the 4 rung-0 scores
    for bracket in range(2):
        start = bracket * BRACKET
        rung_starts = [start, start + RUNGS[0], start + RUNGS[0] + RUNGS[1]]
        for rung in (1, 2):
            lower = trials[rung_starts[rung - 1] : rung_starts[rung - 1] + RUNGS[rung - 1]]
            promoted = trials[rung_starts[rung] : rung_starts[rung] + RUNGS[rung]]
            best_first = sorted(lower, key=lambda t: (-t.objective, t.index))[: RUNGS[rung]]
            assert [t.promoted_from for t in promoted] == [t.index for t in best_first]
            assert [t.point for t in promoted] == [t.point for t in best_first]
        assert all(t.promoted_from is None for t in trials[start : start + RUNGS[0]])

    top = [t for t in trials if t.fidelity == 24]
    assert len(top) == 2
    best = max(top, key=lambda t: (t.objective, -t.index))
    assert fresh.best.index == best.index and fresh.top_fidelity == 24
    summary = json.loads(fresh.summary_path.read_text())
    assert summary["best"]["index"] == best.index
    assert [t["fidelity"] for t in summary["trials"][:2]] == [24, 24]  # ranked ones first
    assert summary["multi_fidelity"] == {"fidelities": FIDELITIES, "eta": ETA, "ranked_at": 24,
                                         "trials_per_fidelity": {"6": 8, "12": 4, "24": 2}}
    assert fresh.plot_path is not None and fresh.plot_path.read_bytes()[:4] == b"\x89PNG"

    # Each fidelity's cached rows include the smaller one's; the top one is the plain subset.
    artifacts = fresh.summary_path.parents[4]  # <artifacts>/merged/<method>/<combo>/sweeps/
    for task in ("topic", "mood"):
        folder = artifacts / "subsets" / task / "test"
        rows = [set(json.loads((folder / f"subset_n{f}of24_seed0_shuf_strat.json").read_text())["indices"])
                for f in (6, 12)]
        rows.append(set(json.loads((folder / "subset_n24_seed0_shuf_strat.json").read_text())["indices"]))
        assert [len(r) for r in rows] == [6, 12, 24] and rows[0] <= rows[1] <= rows[2]

    index = read_index(fresh.summary_path.parent.parent / "eval" / "index.json")
    assert sorted(e["trial"] for e in index) == list(range(2 * BRACKET))
    by_trial = {e["trial"]: e["subset"] for e in index}
    assert {by_trial[t.index].split("_seed")[0] for t in trials if t.fidelity == 6} == {"subset_n6of24"}
    assert {by_trial[t.index] for t in top} == {subset_namespace(_config().eval_subset)}


# --- resume ----------------------------------------------------------------------------------


def test_interrupted_sweep_resumes_without_losing_rerunning_or_reindexing_a_trial(
        fresh, tiny_session_factory, tmp_path, monkeypatch) -> None:
    artifacts = tmp_path / "artifacts"
    # 1. Cancelled mid-bracket, between rung 0 and its promotions (after trial 4 of 14).
    cancel = CancelToken()
    session = tiny_session_factory(artifacts)
    with pytest.raises(Cancelled):
        run_sweep(_config(), session, cancel=cancel,
                  on_trial=lambda t: cancel.cancel() if t.index == 4 else None)
    # 2. Killed after trial 9's index entry was written, before its trial file was: it is not
    #    finished, so it runs again, and its index entry is not written twice.
    original = Sweep._record

    def dies_on_nine(self, trial):  # type: ignore[no-untyped-def]
        if trial.index == 9:
            raise KeyboardInterrupt("killed before the trial file")
        return original(self, trial)

    monkeypatch.setattr(Sweep, "_record", dies_on_nine)
    second = tiny_session_factory(artifacts)
    evaluated = _count_evaluations(second)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(_config(), second)
    assert len(evaluated) == 10 - 5  # trials 5..9; 0..4 were read back
    monkeypatch.setattr(Sweep, "_record", original)
    sweep_id = plan_sweep(_config(), second.workspace).sweep_id
    trials_dir = trial_file(artifacts, "task_vector", ["topic", "mood"], sweep_id, 0).parent
    finished = {p.name: p.read_bytes() for p in trials_dir.glob("trial_*.json")}
    assert sorted(finished) == [f"trial_{i:04d}.json" for i in range(9)]
    index_path = trials_dir.parent.parent.parent / "eval" / "index.json"
    assert 9 in [e["trial"] for e in read_index(index_path)]  # indexed, yet unfinished

    # 3. Run to the end: finished trials are read back, the rest evaluated once each.
    third = tiny_session_factory(artifacts)
    evaluated = _count_evaluations(third)
    resumed = run_sweep(_config(), third)
    assert resumed.resumed_trials == 9 and len(evaluated) == 2 * BRACKET - 9
    for name, content in finished.items():
        assert (trials_dir / name).read_bytes() == content
    index = read_index(resumed.summary_path.parent.parent / "eval" / "index.json")
    ids = [e["id"] for e in index]
    assert len(ids) == len(set(ids)) == 2 * BRACKET
    # The same sweep as an uninterrupted one: same points, fidelities, promotions and best.
    assert [(t.point, t.fidelity, t.promoted_from) for t in resumed.trials] == \
        [(t.point, t.fidelity, t.promoted_from) for t in fresh.trials]
    assert resumed.best.point == fresh.best.point


# --- warm start ------------------------------------------------------------------------------


def test_warm_start_uses_only_trials_at_fidelities_the_sweep_scores_at(
        fresh, fresh_artifacts, tiny_session_factory) -> None:
    # Other sweeps (other ids) in the same artifacts dir: the cached references are reused.
    session = tiny_session_factory(fresh_artifacts)
    plain_body = _body(budget=1, init_points=1, warm_start_sweeps=[str(fresh.summary_path)])
    del plain_body["search"]["multi_fidelity"]
    plain = run_sweep(parse_merge_config(plain_body), session)
    reasons = [s["reason"] for s in plain.warm_start["skipped"]]
    assert plain.warm_start["used"] == 2  # the two top-fidelity trials
    assert len(reasons) == 12 and all(r.startswith("scored at fidelity ") for r in reasons)
    assert all("this sweep scores at 24" in r for r in reasons)

    # A multi-fidelity sweep takes the plain sweep's trials (at 24) and the other sweep's at
    # every fidelity: with d + 2 = 4 of them at 12, its first bracket is modelled already.
    warm = run_sweep(_config(budget=BRACKET, init_points=3, seed=11,
                             warm_start_sweeps=[str(plain.summary_path), str(fresh.summary_path)]),
                     session)
    assert warm.warm_start["used"] == 1 + 2 * BRACKET and warm.warm_start["skipped"] == []
    assert {t.source for t in warm.trials} == {"gp"}


# --- refused configs -------------------------------------------------------------------------


@pytest.mark.parametrize(("search", "fragment"), [
    ({"multi_fidelity": {"fidelities": [12, 6, 24]}}, "fidelities must increase strictly"),
    ({"multi_fidelity": {"fidelities": [24]}}, "at least 2 items"),
    ({"multi_fidelity": {"fidelities": [6, 24], "eta": 1}}, "greater than or equal to 2"),
    ({"multi_fidelity": {"fidelities": [6, 24], "rungs": 2}}, "rungs"),
    ({"acquisition": "logei"}, "needs acquisition qlognei"),
    ({"budget": 6}, "smaller than one successive-halving bracket (7 trials: 4 at 6, 2 at 12, 1 at 24)"),
    ({"type": "grid", "grid": {"lambda": [0.5]}}, "needs search.type bayes"),
])
def test_bad_search_blocks_are_refused_when_parsed(search: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError) as error:
        _config(**search)
    assert fragment in str(error.value)


@pytest.mark.parametrize(("eval_subset", "fragment"), [
    (None, "needs an eval_subset with max_samples"),
    ({"stratified": True}, "needs an eval_subset with max_samples"),
    ({"max_samples": 30}, "fidelities ends at 24, but eval_subset.max_samples is 30"),
    ({"max_samples": 24, "per_task": {"mood": {"max_samples": 10}}}, "per_task sets max_samples for mood"),
])
def test_eval_subsets_that_cannot_define_the_fidelities_are_refused_at_planning(
        tiny_session_factory, tmp_path, eval_subset: dict[str, Any] | None, fragment: str) -> None:
    body = {**_body(), "eval_subset": eval_subset}
    with pytest.raises(ConfigError) as error:
        plan_sweep(parse_merge_config(body), tiny_session_factory(tmp_path).workspace)
    assert fragment in str(error.value)


# --- the HTTP service ------------------------------------------------------------------------


def test_service_runs_a_multi_fidelity_sweep(tiny_workspace: Path, tmp_path: Path) -> None:
    settings = Settings(workspace=tiny_workspace, artifacts_dir=tmp_path / "artifacts")
    body = _body(budget=BRACKET)
    with thread_server(settings) as (client, _):
        schema = client.get("/openapi.json").json()["components"]["schemas"]
        assert "fidelities" in schema["MultiFidelityConfig"]["properties"]
        assert "multi_fidelity" in schema["SearchConfig"]["properties"]

        posted = client.post("/sweeps", json=body)
        assert posted.status_code == 202, posted.text
        job = wait_job(client, posted.json()["id"])
        assert job["status"] == "succeeded", job
        assert job["result"]["best"]["fidelity"] == 24
        trials = client.get(f"/sweeps/{posted.json()['id']}/trials").json()["trials"]
        assert [t["fidelity"] for t in trials] == _expected_fidelities(BRACKET)

        for bad, fragment in [
            ({**body, "search": {**body["search"], "multi_fidelity": {"fidelities": [6, 24], "eta": 1}}},
             "greater than or equal to 2"),
            ({**body, "eval_subset": {"max_samples": 30}}, "fidelities ends at 24"),
        ]:
            answer = client.post("/sweeps", json=bad)
            assert answer.status_code == 422, answer.text
            assert answer.headers["content-type"].startswith("application/problem+json")
            assert fragment in json.dumps(answer.json()), answer.json()
