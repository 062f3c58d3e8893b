"""Bad inputs: each gets a clear MergeError (a ValueError) and leaves no run directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merging_core import run_merge
from merging_core.errors import (
    AdapterNotFoundError,
    ConfigError,
    IncompatibleAdaptersError,
    MergeError,
    NonFiniteWeightsError,
    ParamError,
    UnknownMethodError,
    UnsupportedAdapterError,
)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def two(adapters: dict[str, Path]) -> list[str]:
    return [str(adapters["alpha"]), str(adapters["beta"])]


def _fails(tmp_path: Path, config: dict, error: type[MergeError], match: str) -> None:
    artifacts = tmp_path / "artifacts"
    with pytest.raises(error, match=match):
        run_merge(config, artifacts_dir=artifacts, save=True)
    runs = list(artifacts.rglob("run_*")) + list(artifacts.rglob(".tmp_run_*"))
    assert runs == [], f"partial run directories left behind: {runs}"
    assert issubclass(error, ValueError)


def test_unknown_method(two, tmp_path) -> None:
    _fails(tmp_path, {"adapters": two, "method": "tiess"}, UnknownMethodError,
           r"unknown merge method 'tiess'; available: .*ties")


def test_missing_parameter(two, tmp_path) -> None:
    _fails(tmp_path, {"adapters": two, "method": "weighted_delta"}, ParamError,
           r"requires parameter 'lambda'")


@pytest.mark.parametrize(
    "method, params, match",
    [
        ("ties", {"k": 120}, r"'k'=120 is out of range; allowed \[0, 100\]"),
        ("dare_ties", {"density": -0.1}, r"'density'=-0.1 is out of range"),
        ("slerp", {"t": 2}, r"'t'=2 is out of range"),
        ("ties", {"k": "many"}, r"'k' must be a number"),
        ("ties", {"kk": 3}, r"no parameter 'kk'; allowed: k, lambda"),
        ("della", {"density": 0.1, "epsilon": 0.5}, r"density=0.1 and epsilon=0.5"),
    ],
)
def test_out_of_range_or_unknown_parameter(method, params, match, two, tmp_path) -> None:
    _fails(tmp_path, {"adapters": two, "method": method, "method_params": params}, ParamError, match)


def test_lambda_list_of_wrong_length(two, tmp_path) -> None:
    _fails(tmp_path, {"adapters": two, "method": "task_vector", "method_params": {"lambda": [1, 2, 3]}},
           ParamError, r"'lambda' has 3 values but there are 2 adapters")
    _fails(tmp_path, {"adapters": two, "method": "task_vector",
                      "lambda_policy": {"type": "per_layer", "default": 1.0, "overrides": {1: [1.0]}}},
           ParamError, r"layer 1.*'lambda' has 1 values but there are 2 adapters")


def test_scalar_weighted_lambda_needs_two_adapters(adapters, tmp_path) -> None:
    three = [str(p) for p in adapters.values()]
    _fails(tmp_path, {"adapters": three, "method": "weighted_delta", "method_params": {"lambda": 0.5}},
           ParamError, r"needs exactly 2 adapters; give a list of 3 weights")


def test_too_few_or_too_many_adapters(adapters, tmp_path) -> None:
    three = [str(p) for p in adapters.values()]
    _fails(tmp_path, {"adapters": three, "method": "slerp"}, ParamError,
           r"'slerp' takes exactly 2 adapters, got 3")
    _fails(tmp_path, {"adapters": three[:1], "method": "ties"}, ParamError,
           r"'ties' takes at least 2 adapters, got 1")


def test_nonexistent_adapter(two, tmp_path) -> None:
    _fails(tmp_path, {"adapters": [two[0], str(tmp_path / "nope")], "method": "uniform"},
           AdapterNotFoundError, r"'.*nope' is neither a known task \(known tasks: none\) nor an")


def test_bin_only_adapter_is_refused(two, tmp_path) -> None:
    pickled = _copy(Path(two[1]), tmp_path / "pickled")
    weights = load_file(pickled / "adapter_model.safetensors")
    (pickled / "adapter_model.safetensors").unlink()
    torch.save(weights, pickled / "adapter_model.bin")
    _fails(tmp_path, {"adapters": [two[0], str(pickled)], "method": "uniform"},
           UnsupportedAdapterError, r"only has adapter_model.bin \(a pickle\)")


def test_dora_adapter_is_refused(two, tmp_path) -> None:
    dora = _copy(Path(two[1]), tmp_path / "dora")
    config = json.loads((dora / "adapter_config.json").read_text())
    config["use_dora"] = True
    (dora / "adapter_config.json").write_text(json.dumps(config))
    _fails(tmp_path, {"adapters": [two[0], str(dora)], "method": "uniform"},
           UnsupportedAdapterError, r"uses DoRA")


def test_adapters_of_different_base_models(two, tmp_path) -> None:
    other = _copy(Path(two[1]), tmp_path / "other")
    config = json.loads((other / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "meta-llama/Llama-3.2-1B"
    (other / "adapter_config.json").write_text(json.dumps(config))
    _fails(tmp_path, {"adapters": [two[0], str(other)], "method": "uniform"},
           IncompatibleAdaptersError, r"different base models \(alpha: tiny-llama, other: Llama-3.2-1B\)")


def test_mismatched_shapes(two, make_adapter, tmp_path) -> None:
    wider = _copy(Path(two[1]), tmp_path / "wider")
    weights = load_file(wider / "adapter_model.safetensors")
    key = next(k for k in weights if "layers.0.self_attn.q_proj.lora_B" in k)
    weights[key] = torch.zeros(40, weights[key].shape[1])
    save_file(weights, wider / "adapter_model.safetensors")
    _fails(tmp_path, {"adapters": [two[0], str(wider)], "method": "uniform", "merge_mode": "strict"},
           IncompatibleAdaptersError, r"different weight shapes.*layers.0.self_attn.q_proj \(alpha: 32x32, wider: 40x32\)")


def test_strict_refuses_different_module_sets_and_common_reports_them(two, make_adapter, tmp_path) -> None:
    narrow = make_adapter("narrow", r=4, seed=5, targets=["q_proj", "v_proj"])
    _fails(tmp_path, {"adapters": [two[0], str(narrow)], "method": "uniform", "merge_mode": "strict"},
           IncompatibleAdaptersError, r"merge_mode=strict but the adapters target different modules \(alpha only: .*k_proj")
    result = run_merge({"adapters": [two[0], str(narrow)], "method": "uniform"}, artifacts_dir=tmp_path)
    assert all(m.endswith(("q_proj", "v_proj")) for m in result.output.modules)
    assert "model.layers.0.self_attn.k_proj" in result.metadata["left_out"]["alpha"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_weights(bad, two, tmp_path) -> None:
    broken = _copy(Path(two[1]), tmp_path / "broken")
    weights = load_file(broken / "adapter_model.safetensors")
    key = sorted(weights)[0]
    weights[key][0, 0] = bad
    save_file(weights, broken / "adapter_model.safetensors")
    _fails(tmp_path, {"adapters": [two[0], str(broken)], "method": "uniform"},
           NonFiniteWeightsError, rf"tensor '{key}' contains NaN or Inf")


def test_unknown_config_key_and_duplicate_adapters(two, tmp_path) -> None:
    _fails(tmp_path, {"adapters": two, "method": "uniform", "methd_params": {}}, ConfigError,
           r"methd_params: Extra inputs are not permitted")
    _fails(tmp_path, {"adapters": [two[0], two[0]], "method": "uniform"}, ConfigError,
           r"listed more than once")


def test_weighted_refuses_different_ranks(two, tmp_path) -> None:
    _fails(tmp_path, {"adapters": two, "method": "weighted", "method_params": {"lambda": 0.5}},
           IncompatibleAdaptersError, r"needs equal ranks.*use weighted_delta")


def test_unknown_transform_and_optimizer(two, tmp_path) -> None:
    _fails(tmp_path, {"adapters": two, "method": "uniform", "transforms": ["sharpen"]},
           UnknownMethodError, r"unknown transform 'sharpen'; available: breadcrumbs")
    _fails(tmp_path, {"adapters": two, "method": "uniform", "optimizer": "bogus"},
           UnknownMethodError, r"unknown optimizer 'bogus'; available: adamerging, bayes, none")


def test_a_failure_while_saving_leaves_no_run_directory(two, tmp_path) -> None:
    """Late failure: the hidden temp bundle already holds saved tensors when saving is
    interrupted (here from the progress callback, as a cancel or a full disk would); the run
    directory itself only ever appears by the final rename (`publish_merge`)."""
    from merging_core.errors import Cancelled

    artifacts = tmp_path / "artifacts"
    seen: list[str] = []

    def progress(done: int, total: int, message: str, extra: dict) -> None:
        seen.append(message)
        if message.startswith("saved") and done >= 2:
            assert list(artifacts.rglob(".tmp_run_*")) and not list(artifacts.rglob("run_*"))
            raise Cancelled("interrupted while saving")

    with pytest.raises(Cancelled):
        run_merge({"adapters": two, "method": "ties"}, artifacts_dir=artifacts, save=True,
                  progress=progress)
    assert any(m.startswith("saved") for m in seen)
    runs = list(artifacts.rglob("run_*")) + list(artifacts.rglob(".tmp_run_*"))
    assert runs == [], f"partial run directories left behind: {runs}"
