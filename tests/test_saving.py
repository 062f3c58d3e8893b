"""Saved merges: exact for linear methods, SVD with a recorded error for the others, and
loadable by `peft.PeftModel.from_pretrained` with the same logits as the in-memory merge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from merging_core import run_merge
from merging_core.adapters import load_adapter
from merging_core.engine.saving import low_rank


def _saved_deltas(run_dir: Path) -> dict[str, torch.Tensor]:
    saved = load_adapter(run_dir, "saved")
    return {name: module.delta() for name, module in saved.modules.items()}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(
    "method, params",
    [("uniform", {}), ("weighted_delta", {"lambda": [0.2, 0.3, 0.5]}), ("task_vector", {"lambda": 0.8})],
)
def test_linear_saves_are_exact_concatenations(method, params, adapters, tmp_path) -> None:
    result = run_merge(
        {"adapters": [str(p) for p in adapters.values()], "method": method, "method_params": params},
        artifacts_dir=tmp_path, save=True,
    )
    saved = result.metadata["saved"]
    assert saved["exact"] and saved["svd_relative_error_max"] == 0.0
    assert saved["rank"] == 16 and saved["rank_pattern"]  # 4 + 8 + 4, and 4 + 8 + 2 for one module
    for module, delta in _saved_deltas(result.run_dir).items():
        assert _relative(delta, result.output.delta(module)) < 1e-5


def test_per_layer_linear_save_is_exact(adapters, tmp_path) -> None:
    result = run_merge(
        {"adapters": [str(p) for p in adapters.values()], "method": "task_vector",
         "lambda_policy": {"type": "per_layer", "default": 0.5, "overrides": {0: 1.5}}},
        artifacts_dir=tmp_path, save=True,
    )
    for module, delta in _saved_deltas(result.run_dir).items():
        assert _relative(delta, result.output.delta(module)) < 1e-5


@pytest.mark.parametrize("method", ["weighted", "tsv", "knots"])
def test_factor_space_saves_are_exact_at_their_own_rank(method, equal_rank_adapters, tmp_path) -> None:
    """`weighted` keeps its rank (4); `tsv` and `knots` save at the sum of ranks (8); exactly."""
    params = {"lambda": [0.7, 0.3]} if method == "weighted" else {}
    result = run_merge(
        {"adapters": [str(p) for p in equal_rank_adapters.values()], "method": method, "method_params": params},
        artifacts_dir=tmp_path, save=True,
    )
    saved = result.metadata["saved"]
    assert saved["exact"] and saved["rank"] == (4 if method == "weighted" else 8)
    for module, delta in _saved_deltas(result.run_dir).items():
        assert _relative(delta, result.output.delta(module)) < 1e-5


def test_nonlinear_save_records_its_svd_error(adapters, tmp_path) -> None:
    result = run_merge(
        {"adapters": [str(p) for p in adapters.values()], "method": "ties", "save_rank": 4},
        artifacts_dir=tmp_path, save=True,
    )
    saved = result.metadata["saved"]
    assert saved["rank"] == 4 and not saved["exact"]
    for module, delta in _saved_deltas(result.run_dir).items():
        error = _relative(delta, result.output.delta(module))
        assert error == pytest.approx(saved["svd_relative_error"][module], rel=1e-3, abs=1e-6)
        assert 0 < error < 1


def test_low_rank_is_optimal_for_a_low_rank_matrix() -> None:
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(600, 12, generator=generator) @ torch.randn(12, 700, generator=generator)
    lora_B, lora_A, error = low_rank(matrix, 16)  # randomized path (min dim > 512)
    assert lora_B.shape == (600, 12) or lora_B.shape == (600, 16)
    assert error < 1e-5
    assert _relative(lora_B @ lora_A, matrix) < 1e-5


def _logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=input_ids).logits


def _apply_in_memory(base: Path, deltas: dict[str, torch.Tensor]) -> LlamaForCausalLM:
    model = LlamaForCausalLM.from_pretrained(base)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, delta in deltas.items():
            modules[name].weight += delta
    return model.eval()


@pytest.mark.parametrize(
    "method, params, save_rank",
    [
        ("task_vector", {"lambda": 0.8}, 64),
        ("weighted_delta", {"lambda": [0.2, 0.3, 0.5]}, 64),
        ("ties", {"k": 20}, 64),
        ("dare_ties", {"density": 0.5}, 64),
        ("ties", {"k": 20}, 6),
        ("tsv", {"lambda": 0.9}, 64),
        ("knots", {"k": 30}, 64),
    ],
)
def test_saved_adapter_loads_with_peft_and_gives_the_in_memory_logits(
    method, params, save_rank, adapters, llama_base, tmp_path
) -> None:
    result = run_merge(
        {"adapters": [str(p) for p in adapters.values()], "method": method,
         "method_params": params, "save_rank": save_rank},
        artifacts_dir=tmp_path, save=True,
    )
    input_ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    in_memory = _logits(_apply_in_memory(llama_base, result.output.deltas()), input_ids)
    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(llama_base), result.run_dir)
    loaded = _logits(peft_model.eval(), input_ids)
    error = result.metadata["saved"]["svd_relative_error_max"]
    if error < 1e-5:
        torch.testing.assert_close(loaded, in_memory, rtol=1e-4, atol=1e-4)
    else:
        # Within what the recorded SVD error allows: exactly the saved low-rank deltas...
        low_rank_logits = _logits(_apply_in_memory(llama_base, _saved_deltas(result.run_dir)), input_ids)
        torch.testing.assert_close(loaded, low_rank_logits, rtol=1e-4, atol=1e-4)
        # ...whose distance from the exact merge is of the order of the recorded error.
        base_logits = _logits(LlamaForCausalLM.from_pretrained(llama_base).eval(), input_ids)
        change = (in_memory - base_logits).norm()
        assert (loaded - in_memory).norm() <= 3 * error * change + 1e-4


def test_heads_are_saved_per_task_and_never_averaged(bert_adapters, tmp_path) -> None:
    result = run_merge(
        {"adapters": [str(p) for p in bert_adapters.values()], "method": "uniform"},
        artifacts_dir=tmp_path, save=True,
    )
    heads = result.metadata["saved"]["heads"]
    assert set(heads) == {"intent", "sentiment"}
    intent = load_file(result.run_dir / heads["intent"])
    original = load_file(bert_adapters["intent"] / "adapter_model.safetensors")
    stored = {k: v for k, v in intent.items() if k.endswith("weight")}
    assert len(stored) == 1
    (name, weight), = stored.items()
    torch.testing.assert_close(weight, original[f"base_model.model.{name}"])
    assert weight.shape[0] == 3  # intent has 3 labels, sentiment 2
    config = json.loads((result.run_dir / "adapter_config.json").read_text())
    assert not config.get("modules_to_save")
