"""Layer keys for encoder-decoder models: a module in an encoder and decoder stack is keyed
`encoder.3` / `decoder.3` (Whisper, T5), a single-stack model's by its index (Llama, BERT). The
keys go through per-layer lambda policies, search coordinates, layer groups and their labels,
and AdaMerging's learned lambdas; tested on a tiny random Whisper with real PEFT LoRA adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from merging_core import run_merge
from merging_core.adapters import layer_keys, layer_sort_key, parse_layer_key
from merging_core.config import parse_merge_config
from merging_core.engine.plan import plan_merge
from merging_core.engine.runner import load_merge
from merging_core.errors import ConfigError
from merging_core.search import plan_sweep, run_sweep
from merging_core.search.space import (
    build_dimensions,
    coordinate_labels,
    grid_point_to_merge,
    layer_order,
    parse_coordinate,
    resolve_layer_groups,
    split_layers,
)
from tests.speech_helpers import lora_adapter, tiny_whisper

WHISPER_LAYERS = ["encoder.0", "encoder.1", "decoder.0", "decoder.1"]


@pytest.fixture(scope="module")
def whisper_adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("whisper_keys")
    base = tiny_whisper(root / "base")
    return {name: lora_adapter(base, root / name, seed) for seed, name in enumerate(["asr", "intent"], start=3)}


# --- parsing and order ----------------------------------------------------------------------


@pytest.mark.parametrize(("modules", "expected"), [
    (["model.layers.3.self_attn.q_proj", "model.layers.10.mlp.down_proj", "lm_head"], [3, 10, None]),
    (["bert.encoder.layer.3.attention.self.query"], [3]),  # one stack: plain indices
    (["model.decoder.layers.2.self_attn.q_proj"], [2]),  # OPT's decoder-only path
    (["model.encoder.layers.3.self_attn.q_proj", "model.decoder.layers.3.self_attn.q_proj",
      "model.decoder.layers.3.encoder_attn.v_proj", "proj_out"], ["encoder.3", "decoder.3", "decoder.3", None]),
    (["encoder.block.3.layer.0.SelfAttention.q", "decoder.block.1.layer.1.EncDecAttention.v"],
     ["encoder.3", "decoder.1"]),  # T5: the block is the layer, not the sub-layer
])
def test_layer_keys_of_llama_bert_opt_whisper_and_t5_paths(modules: list[str], expected: list[object]) -> None:
    assert list(layer_keys(modules).values()) == expected


def test_encoder_layers_sort_before_decoder_layers_and_bad_keys_are_named() -> None:
    assert sorted(["decoder.0", "encoder.10", "decoder.2", "encoder.2"], key=layer_sort_key) == [
        "encoder.2", "encoder.10", "decoder.0", "decoder.2"]
    assert sorted([10, 2, 0], key=layer_sort_key) == [0, 2, 10]
    assert parse_layer_key("3") == 3 and parse_layer_key("decoder.3") == "decoder.3"
    for bad in ("decoder.x", "middle.1", "decoder.01", "decoder", True, 1.5):
        with pytest.raises(ValueError, match="layer key"):
            parse_layer_key(bad)
    with pytest.raises(ConfigError, match=r"layer key 'decoder\.x'"):
        parse_merge_config({"adapters": ["a", "b"], "method": "task_vector",
                            "lambda_policy": {"type": "per_layer", "overrides": {"decoder.x": 0.5}}})
    with pytest.raises(ConfigError, match=r"search coordinate 'lambda@middle\.1'"):
        parse_coordinate("lambda@middle.1")
    assert parse_coordinate("lambda@decoder.1").layer == "decoder.1"
    assert parse_coordinate("lambda@layer3").layer == 3


# --- per-layer policies through a real merge ----------------------------------------------------


def test_a_decoder_override_changes_only_that_decoder_layer(whisper_adapters: dict[str, Path],
                                                           tmp_path: Path) -> None:
    common = {"adapters": list(whisper_adapters), "method": "task_vector", "method_params": {"lambda": 0.5}}
    plain = run_merge(common, task_registry=whisper_adapters, artifacts_dir=tmp_path / "plain")
    override = run_merge({**common, "lambda_policy": {"type": "per_layer", "overrides": {"decoder.1": 2.0}}},
                         task_registry=whisper_adapters, artifacts_dir=tmp_path / "override")
    keys = layer_keys(override.output.modules)
    assert sorted(set(keys.values()), key=layer_sort_key) == WHISPER_LAYERS
    assert {keys[m] for m in keys if ".decoder.layers.1." in m} == {"decoder.1"}
    before, after = plain.output.deltas(), override.output.deltas()
    changed = set()
    for module, delta in after.items():
        expected = sum((2.0 if keys[module] == "decoder.1" else 0.5) * a.modules[module].delta()
                       for a in override.output.adapters)
        torch.testing.assert_close(delta, expected)
        if not torch.equal(delta, before[module]):
            changed.add(module)
    # decoder layer 1 only: its self- and cross-attention q/v, not encoder layer 1's
    assert changed == {m for m in keys if keys[m] == "decoder.1"} and len(changed) == 4
    assert override.metadata["lambda_policy"]["overrides"] == {"decoder.1": 2.0}


def test_keys_of_the_wrong_kind_are_refused(whisper_adapters: dict[str, Path],
                                            adapters: dict[str, Path]) -> None:
    per_layer = {"adapters": ["alpha", "gamma"], "method": "task_vector",
                 "lambda_policy": {"type": "per_layer", "overrides": {"decoder.1": 0.5}}}
    with pytest.raises(ConfigError, match=r"layer key 'decoder\.1' names a stack, but the merge's modules"):
        plan_merge(per_layer, adapters)  # tiny Llama: one stack
    with pytest.raises(ConfigError, match=r"layer key 1 is a plain index.*encoder\.1 or decoder\.1"):
        plan_merge({**per_layer, "adapters": list(whisper_adapters),
                    "lambda_policy": {"type": "per_layer", "overrides": {1: 0.5}}}, whisper_adapters)
    # A stack layer past the stack's end overrides nothing, as a plain index past the end always did.
    plan_merge({**per_layer, "adapters": list(whisper_adapters),
                "lambda_policy": {"type": "per_layer", "overrides": {"decoder.9": 0.5}}}, whisper_adapters)


# --- layer groups over the stacks ---------------------------------------------------------------


def test_groups_split_encoder_then_decoder_layers_and_labels_name_the_stacks() -> None:
    order = ["encoder.0", "encoder.1", "encoder.2", "decoder.0", "decoder.1", "decoder.2"]
    groups = split_layers(order, 4)  # the first 6 mod 4 groups one longer
    assert groups == (("encoder.0", "encoder.1"), ("encoder.2", "decoder.0"), ("decoder.1",), ("decoder.2",))
    assert coordinate_labels(["lambda@group1", "lambda@group0[1]", "lambda@decoder.1"], groups, ["asr", "intent"]) == {
        "lambda@group1": "lambda@group1 (encoder 2, decoder 0)",
        "lambda@group0[1]": "lambda@group0[1] (encoder 0-1, intent)",
        "lambda@decoder.1": "lambda@decoder.1",
    }
    # L counts every layer up to each stack's last one, as a single stack counts up to its last index
    assert layer_order(["model.encoder.layers.2.q", "model.decoder.layers.0.q"]) == [
        "encoder.0", "encoder.1", "encoder.2", "decoder.0"]


def test_grid_groups_over_whisper_become_stack_overrides(whisper_adapters: dict[str, Path]) -> None:
    config = parse_merge_config({
        "adapters": list(whisper_adapters), "method": "task_vector", "method_params": {"lambda": 0.4},
        "search": {"type": "grid", "grid": {"lambda@group0": [[1.0, 0.25]], "lambda@group1": [0.5],
                                            "lambda@group2": [0.0]}},
    })
    probe = plan_merge(config.model_copy(update={"search": None}), whisper_adapters)
    groups = resolve_layer_groups(config.search, probe.modules)
    assert groups == (("encoder.0", "encoder.1"), ("decoder.0",), ("decoder.1",))
    assert coordinate_labels(list(config.search.grid), groups) == {
        "lambda@group0": "lambda@group0 (encoder 0-1)", "lambda@group1": "lambda@group1 (decoder 0)",
        "lambda@group2": "lambda@group2 (decoder 1)"}
    point = {"lambda@group0": [1.0, 0.25], "lambda@group1": 0.5, "lambda@group2": 0.0}
    params, policy = grid_point_to_merge(point, config, groups)
    lambdas = {"encoder.0": [1.0, 0.25], "encoder.1": [1.0, 0.25], "decoder.0": 0.5, "decoder.1": 0.0}
    assert policy["overrides"] == lambdas
    output = load_merge(plan_merge({**config.model_dump(exclude_unset=True, exclude={"search"}),
                                    "method_params": params, "lambda_policy": policy}, whisper_adapters))
    keys = layer_keys(output.modules)
    for module, delta in output.deltas().items():
        lam = lambdas[keys[module]]
        weights = lam if isinstance(lam, list) else [lam, lam]
        torch.testing.assert_close(delta, sum(w * a.modules[module].delta() for w, a in zip(weights, output.adapters)))

    bayes = parse_merge_config({"adapters": list(whisper_adapters), "method": "task_vector", "search": {
        "type": "bayes", "budget": 2, "init_points": 2,
        "space": {"lambda": {"min": 0.0, "max": 1.0, "per_layer_groups": 1, "per_adapter": True}}}})
    one_group = resolve_layer_groups(bayes.search, probe.modules)
    names = [d.name for d in build_dimensions(bayes.search, 2, True)]
    assert coordinate_labels(names, one_group, list(whisper_adapters)) == {
        "lambda@group0[0]": "lambda@group0[0] (encoder 0-1, decoder 0-1, asr)",
        "lambda@group0[1]": "lambda@group0[1] (encoder 0-1, decoder 0-1, intent)"}


def test_per_layer_stack_keys_in_a_bayes_space(whisper_adapters: dict[str, Path]) -> None:
    bayes = parse_merge_config({"adapters": list(whisper_adapters), "method": "task_vector", "search": {
        "type": "bayes", "budget": 2, "init_points": 2,
        "space": {"lambda": {"min": 0.0, "max": 1.0, "per_layer": ["encoder.0", "decoder.1"]}}}})
    assert [d.name for d in build_dimensions(bayes.search, 2, True)] == ["lambda@encoder.0", "lambda@decoder.1"]
    with pytest.raises(ConfigError, match="write a layer index as a number"):
        parse_merge_config({"adapters": ["a", "b"], "method": "task_vector", "search": {
            "type": "bayes", "space": {"lambda": {"min": 0.0, "max": 1.0, "per_layer": ["1"]}}}})


# --- through an evaluation session: a sweep and AdaMerging on speech tasks ----------------------


@pytest.fixture(scope="module")
def speech_session(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from merging_core.evaluation.evaluate import EvalSession
    from merging_core.evaluation.workspace import load_workspace
    from tests.speech_helpers import speech_workspace

    workspace = speech_workspace(tmp_path_factory.mktemp("speech_keys"), clips_per_split=4)
    return EvalSession.from_workspace(load_workspace(workspace), tmp_path_factory.mktemp("speech_keys_artifacts"))


def test_a_group_sweep_and_adamerging_on_whisper_use_stack_keys(speech_session) -> None:  # type: ignore[no-untyped-def]
    config = parse_merge_config({
        "adapters": ["asr", "intent"], "method": "task_vector", "eval_subset": {"max_samples": 2},
        "search": {"type": "grid", "grid": {"lambda@group0": [0.5], "lambda@group1": [0.8]}}})
    plan = plan_sweep(config, speech_session.workspace)
    assert plan.layer_groups == (("encoder.0", "encoder.1"), ("decoder.0", "decoder.1"))
    assert plan.labels() == {"lambda@group0": "lambda@group0 (encoder 0-1)",
                             "lambda@group1": "lambda@group1 (decoder 0-1)"}
    result = run_sweep(config, speech_session)
    assert [t.lambda_policy["overrides"] for t in result.trials] == [
        {"encoder.0": 0.5, "encoder.1": 0.5, "decoder.0": 0.8, "decoder.1": 0.8}]
    summary = json.loads(result.summary_path.read_text())
    assert summary["layer_groups"] == [["encoder.0", "encoder.1"], ["decoder.0", "decoder.1"]]

    merged = run_merge(
        {"adapters": ["asr", "intent"], "method": "weighted_delta",
         "optimizer": {"name": "adamerging", "params": {"steps": 1, "batch_size": 2, "split": "train"}}},
        task_registry=speech_session.workspace.task_registry(), artifacts_dir=speech_session.root,
        session=speech_session)
    learned = json.loads((merged.run_dir / "adamerging_lambdas.json").read_text())
    # encoder layers first in the list; the JSON object's keys are written sorted
    assert learned["layers"] == WHISPER_LAYERS and sorted(learned["lambdas"]) == sorted(WHISPER_LAYERS)
    overrides = merged.output.policy.overrides
    assert list(overrides) == WHISPER_LAYERS
    module = next(m for m in merged.output.modules if ".decoder.layers.1.encoder_attn." in m)
    expected = sum(w * a.modules[module].delta() for w, a in zip(overrides["decoder.1"], merged.output.adapters))
    torch.testing.assert_close(merged.output.delta(module), expected)
