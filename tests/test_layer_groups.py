"""Layer groups in search spaces: `per_layer_groups: K` (Bayesian spaces) and `lambda@groupG`
grid keys split the merge's layers into K contiguous blocks, each searched as one lambda
override (per adapter with `per_adapter: true`). Real merges on tiny models, real sweeps on the
tiny workspace, and one real HTTP service."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from app.settings import Settings
from merging_core.adapters import layer_index
from merging_core.config import parse_merge_config
from merging_core.engine.plan import plan_merge
from merging_core.engine.runner import load_merge
from merging_core.errors import ConfigError
from merging_core.search import plan_sweep, run_sweep
from merging_core.search.space import (
    Dimension,
    build_dimensions,
    grid_point_to_merge,
    layer_count,
    parse_coordinate,
    resolve_layer_groups,
    split_layers,
)
from tests.service_helpers import thread_server, wait_job

SUBSET = {"max_samples": 8}


def _sweep(search: dict[str, Any], method: str = "task_vector"):  # type: ignore[no-untyped-def]
    return parse_merge_config({"adapters": ["topic", "mood"], "method": method,
                               "eval_subset": SUBSET, "search": search})


def _bayes_groups(per_adapter: bool, **search: Any) -> dict[str, Any]:
    space = {"lambda": {"min": 0.0, "max": 1.0, "per_layer_groups": 2, "per_adapter": per_adapter}}
    return {"type": "bayes", "budget": 2, "init_points": 2, "seed": 4, "space": space, **search}


def _count_evaluations(session) -> list[int]:  # type: ignore[no-untyped-def]
    evaluations: list[int] = []
    original = session.evaluate_merge
    session.evaluate_merge = lambda *a, **k: evaluations.append(1) or original(*a, **k)  # type: ignore[method-assign]
    return evaluations


def _hand_merged(output, lambdas_by_layer: dict[int, Any]) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """task_vector by hand: sum_i lambda_i * delta_i, lambda_i taken from the module's layer."""
    expected = {}
    for module in output.modules:
        lam = lambdas_by_layer[layer_index(module)]
        weights = lam if isinstance(lam, list) else [lam] * len(output.adapters)
        expected[module] = sum(w * a.modules[module].delta() for w, a in zip(weights, output.adapters))
    return expected


# --- the block rule and the names -----------------------------------------------------------


@pytest.mark.parametrize(("n_layers", "n_groups", "sizes"), [
    (30, 4, [8, 8, 7, 7]), (30, 30, [1] * 30), (30, 1, [30]), (7, 3, [3, 2, 2]), (2, 2, [1, 1]),
])
def test_layers_split_into_contiguous_blocks_first_ones_longer(n_layers, n_groups, sizes) -> None:
    groups = split_layers(n_layers, n_groups)
    assert [len(g) for g in groups] == sizes
    assert [layer for g in groups for layer in g] == list(range(n_layers))  # contiguous, in order
    if (n_layers, n_groups) == (30, 4):
        assert [(g[0], g[-1]) for g in groups] == [(0, 7), (8, 15), (16, 22), (23, 29)]


def test_more_groups_than_layers_and_bad_spaces_are_refused() -> None:
    with pytest.raises(ConfigError, match="5 groups but only 4 layers"):
        split_layers(4, 5)
    modules = [f"model.layers.{i}.self_attn.q_proj" for i in range(3)] + ["lm_head"]
    assert layer_count(modules) == 3  # lm_head has no layer index: it keeps the default lambda
    bayes = _sweep(_bayes_groups(False, space={"lambda": {"min": 0, "max": 1, "per_layer_groups": 4}})).search
    with pytest.raises(ConfigError, match=r"per_layer_groups: 4 layer groups, but .* only 3 layers"):
        resolve_layer_groups(bayes, modules)
    with pytest.raises(ConfigError, match="per_layer_groups must be at least 1"):
        _sweep(_bayes_groups(False, space={"lambda": {"min": 0, "max": 1, "per_layer_groups": 0}}))
    with pytest.raises(ConfigError, match="per_layer and per_layer_groups"):
        _sweep(_bayes_groups(False, space={"lambda": {"min": 0, "max": 1, "per_layer_groups": 2,
                                                      "per_layer": [0]}}))
    density = _sweep(_bayes_groups(False, space={"density": {"min": 0, "max": 1, "per_layer_groups": 2}}))
    with pytest.raises(ConfigError, match="only lambda can have them"):
        build_dimensions(density.search, 2, True)
    grid_missing = _sweep({"type": "grid", "grid": {"lambda@group0": [0.5], "lambda@group2": [0.5]}}).search
    with pytest.raises(ConfigError, match="missing lambda@group1"):
        resolve_layer_groups(grid_missing, modules)
    mixed = _sweep({"type": "grid", "grid": {"lambda@group0": [0.5], "lambda@layer1": [0.5]}}).search
    with pytest.raises(ConfigError, match="use one of them"):
        resolve_layer_groups(mixed, modules)


def test_group_dimensions_are_named_per_group_then_adapter() -> None:
    search = _sweep(_bayes_groups(True)).search
    dimensions = build_dimensions(search, 2, True)
    assert [d.name for d in dimensions] == [
        "lambda@group0[0]", "lambda@group0[1]", "lambda@group1[0]", "lambda@group1[1]"]
    for dimension in dimensions:
        parsed = parse_coordinate(dimension.name)
        assert (parsed.param, parsed.group, parsed.adapter) == (dimension.param, dimension.group, dimension.adapter)
    assert Dimension("lambda", "float", 0, 1, group=3).name == "lambda@group3"


def test_groups_spanning_several_layers_weight_each_layer_of_their_block(make_adapter, tmp_path) -> None:
    """A 5-layer model, 2 groups: layers 0-2 take group 0's (per-adapter) lambdas, 3-4 group 1's."""
    torch.manual_seed(0)
    base = tmp_path / "five-layers"
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=5,
                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                 max_position_embeddings=64)).save_pretrained(base)
    registry = {name: make_adapter(f"five_{name}", seed=seed, base=base, targets=["q_proj", "v_proj"])
                for seed, name in enumerate(["one", "two"], start=21)}
    config = parse_merge_config({
        "adapters": list(registry), "method": "task_vector", "method_params": {"lambda": 0.4},
        "search": {"type": "grid", "grid": {"lambda@group0": [[1.0, 0.25]], "lambda@group1": [0.5]}},
    })
    probe = plan_merge(config.model_copy(update={"search": None}), registry)
    groups = resolve_layer_groups(config.search, probe.modules)
    assert groups == ((0, 1, 2), (3, 4))
    params, policy = grid_point_to_merge({"lambda@group0": [1.0, 0.25], "lambda@group1": 0.5}, config, groups)
    assert policy["overrides"] == {0: [1.0, 0.25], 1: [1.0, 0.25], 2: [1.0, 0.25], 3: 0.5, 4: 0.5}
    planned = plan_merge({**config.model_dump(exclude_unset=True, exclude={"search"}),
                          "method_params": params, "lambda_policy": policy}, registry)
    output = load_merge(planned)
    expected = _hand_merged(output, {0: [1.0, 0.25], 1: [1.0, 0.25], 2: [1.0, 0.25], 3: 0.5, 4: 0.5})
    merged = output.deltas()
    assert len(merged) == 10
    for module, delta in merged.items():
        torch.testing.assert_close(delta, expected[module])


# --- sweeps on the tiny workspace (2 layers) ------------------------------------------------


def test_grid_sweep_with_group_keys_records_per_layer_overrides(tiny_session_factory, tmp_path) -> None:
    session = tiny_session_factory(tmp_path)
    config = _sweep({"type": "grid", "grid": {"lambda@group0": [0.2, [1.0, 0.5]], "lambda@group1": [0.7]}})
    plan = plan_sweep(config, session.workspace)
    assert plan.layer_groups == ((0,), (1,))  # K = L = 2
    result = run_sweep(config, session)
    assert [t.point for t in result.trials] == [
        {"lambda@group0": 0.2, "lambda@group1": 0.7}, {"lambda@group0": [1.0, 0.5], "lambda@group1": 0.7}]
    assert [t.lambda_policy["overrides"] for t in result.trials] == [
        {"0": 0.2, "1": 0.7}, {"0": [1.0, 0.5], "1": 0.7}]
    assert all(t.lambda_policy["type"] == "per_layer" for t in result.trials)
    summary = json.loads(result.summary_path.read_text())
    assert summary["layer_groups"] == [[0], [1]]
    assert summary["dimensions"] == ["lambda@group0", "lambda@group1"]

    output = load_merge(plan.trial_plan(result.trials[1].point), adapter_cache=session.adapter_cache)
    expected = _hand_merged(output, {0: [1.0, 0.5], 1: 0.7})
    for module, delta in output.deltas().items():
        torch.testing.assert_close(delta, expected[module])

    too_many = _sweep({"type": "grid", "grid": {f"lambda@group{g}": [0.5] for g in range(3)}})
    with pytest.raises(ConfigError, match=r"3 layer groups, but the merge's modules span only 2 layers"):
        plan_sweep(too_many, session.workspace)


def test_bayes_sweep_over_groups_per_adapter(tiny_session_factory, tmp_path) -> None:
    config = _sweep(_bayes_groups(True, budget=4, init_points=3))
    session = tiny_session_factory(tmp_path)
    plan = plan_sweep(config, session.workspace)
    assert len(plan.dimensions) == 4  # 2 groups x 2 adapters: the GP's unit cube is 4-D
    assert plan.labels() == {
        "lambda@group0[0]": "lambda@group0[0] (layer 0, topic)",
        "lambda@group0[1]": "lambda@group0[1] (layer 0, mood)",
        "lambda@group1[0]": "lambda@group1[0] (layer 1, topic)",
        "lambda@group1[1]": "lambda@group1[1] (layer 1, mood)",
    }
    result = run_sweep(config, session)
    assert [t.source for t in result.trials] == ["sobol"] * 3 + ["gp"]
    for trial in result.trials:
        point = trial.point
        assert set(point) == {d.name for d in plan.dimensions}
        assert all(0.0 <= v <= 1.0 for v in point.values())
        assert trial.lambda_policy["overrides"] == {
            str(g): [point[f"lambda@group{g}[0]"], point[f"lambda@group{g}[1]"]] for g in (0, 1)}
    summary = json.loads(result.summary_path.read_text())
    assert summary["layer_groups"] == [[0], [1]] and summary["best"]["point"] == result.best.point
    assert result.plot_path is not None and result.plot_path.read_bytes()[:4] == b"\x89PNG"


def test_warm_start_reuses_group_trials(tiny_session_factory, tmp_path, monkeypatch) -> None:
    session = tiny_session_factory(tmp_path)
    source = run_sweep(_sweep({"type": "grid", "grid": {"lambda@group0": [0.3, 0.9],
                                                        "lambda@group1": [0.6]}}), session)

    # A grid in another order: every point was evaluated before, nothing is evaluated again.
    evaluations = _count_evaluations(session)
    again = run_sweep(_sweep({"type": "grid", "grid": {"lambda@group1": [0.6], "lambda@group0": [0.9, 0.3]},
                              "warm_start_sweeps": [str(source.summary_path)]}), session)
    assert again.warm_start == {"used": 2, "skipped": []} and evaluations == []
    assert {t.source for t in again.trials} == {"warm_start"}

    # A Bayesian space over the same two groups observes both (they cover init_points).
    labels: list[str] = []
    import matplotlib.axes

    real_xlabel = matplotlib.axes.Axes.set_xlabel
    monkeypatch.setattr(matplotlib.axes.Axes, "set_xlabel",
                        lambda self, text, *a, **k: labels.append(text) or real_xlabel(self, text, *a, **k))
    bayes = run_sweep(_sweep(_bayes_groups(False, warm_start_sweeps=[str(source.summary_path)])), session)
    assert bayes.warm_start == {"used": 2, "skipped": []}
    assert [t.source for t in bayes.trials] == ["gp", "gp"] and len(evaluations) == 2
    assert "lambda@group0 (layer 0)" in labels  # the 2-D plot labels its axes with the layers

    # Per-adapter group coordinates round-trip through a summary too.
    per_adapter = run_sweep(_sweep(_bayes_groups(True)), session)
    warm = run_sweep(_sweep(_bayes_groups(True, seed=9, budget=1,
                                          warm_start_sweeps=[str(per_adapter.summary_path)])), session)
    assert warm.warm_start == {"used": 2, "skipped": []} and [t.source for t in warm.trials] == ["gp"]

    # The same names over other layers (a summary written for another model) are not reused.
    other = tmp_path / "other" / "sweep_other.json"
    other.parent.mkdir()
    shutil.copy(per_adapter.summary_path, other)
    edited = json.loads(other.read_text())
    other.write_text(json.dumps({**edited, "layer_groups": [[0, 1, 2], [3, 4]]}))
    skipped = run_sweep(_sweep(_bayes_groups(True, seed=10, budget=1, warm_start_sweeps=[str(other)])),
                        session).warm_start
    assert skipped["used"] == 0
    assert skipped["skipped"][0]["reason"].startswith("layer groups differ")


# --- the HTTP service -------------------------------------------------------------------------


def test_service_sweeps_over_layer_groups(tiny_workspace: Path, tmp_path: Path) -> None:
    settings = Settings(workspace=tiny_workspace, artifacts_dir=tmp_path / "artifacts")
    body = {"adapters": ["topic", "mood"], "method": "task_vector", "eval_subset": SUBSET,
            "search": _bayes_groups(True)}
    with thread_server(settings) as (client, _):
        posted = client.post("/sweeps", json=body)
        assert posted.status_code == 202, posted.text
        assert wait_job(client, posted.json()["id"])["status"] == "succeeded"
        trials = client.get(f"/sweeps/{posted.json()['id']}/trials").json()["trials"]
        assert len(trials) == 2
        assert all(set(t["point"]) == {"lambda@group0[0]", "lambda@group0[1]",
                                       "lambda@group1[0]", "lambda@group1[1]"} for t in trials)

        for space, fragment in [
            ({"per_layer_groups": 3}, "3 layer groups, but the merge's modules span only 2 layers"),
            ({"per_layer_groups": 2, "per_layer": [0, 1]}, "per_layer and per_layer_groups"),
            ({"per_layer_groups": 0}, "per_layer_groups must be at least 1"),
        ]:
            bad = {**body, "search": {**body["search"],
                                      "space": {"lambda": {"min": 0, "max": 1, **space}}}}
            answer = client.post("/sweeps", json=bad)
            assert answer.status_code == 422, answer.text
            assert answer.headers["content-type"].startswith("application/problem+json")
            assert fragment in answer.json()["detail"], answer.json()["detail"]
