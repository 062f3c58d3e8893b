"""The unified config: canonical files load, legacy keys migrate with a DeprecationWarning."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from merging_core import load_merge_config
from merging_core.config import MergeConfig
from merging_core.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "merge"
CANONICAL = [
    "merge_weighted_scalar.yaml",
    "merge_weighted_per_layer.yaml",
    "merge_ties.yaml",
    "merge_weighted_delta_sweep_bayes.yaml",
]


@pytest.mark.parametrize("name", CANONICAL)
def test_canonical_configs_load(name: str, recwarn) -> None:
    config = load_merge_config(CONFIG_DIR / name)
    assert isinstance(config, MergeConfig)
    assert config.adapters and config.method
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning)]
    spec = config.to_spec()
    assert spec.method == config.method


def test_canonical_set_is_complete() -> None:
    assert sorted(p.name for p in CONFIG_DIR.glob("*.yaml")) == sorted(CANONICAL)


def test_sweep_config_fields() -> None:
    config = load_merge_config(CONFIG_DIR / "merge_weighted_delta_sweep_bayes.yaml")
    assert config.search is not None and config.search.type == "bayes"
    assert config.search.space["lambda"].max == 1.0
    assert config.eval_subset is not None and config.eval_subset.max_samples == 200
    per_layer = load_merge_config(CONFIG_DIR / "merge_weighted_per_layer.yaml")
    assert per_layer.lambda_policy.overrides[0] == 0.8


@pytest.mark.parametrize(
    "legacy, new_key, check",
    [
        ({"lambda": 0.3}, "method_params.lambda", lambda c: c.method_params == {"lambda": 0.3}),
        ({"params": {"k": 10}}, "method_params", lambda c: c.method_params == {"k": 10}),
        ({"grid": {"lambda": [0.1, 0.5]}}, r"search.grid \(with search.type: grid\)",
         lambda c: c.search.type == "grid" and c.search.grid == {"lambda": [0.1, 0.5]}),
    ],
)
def test_legacy_keys_load_with_a_deprecation_warning(legacy, new_key, check, tmp_path) -> None:
    path = tmp_path / "legacy.yaml"
    path.write_text(yaml.safe_dump({"adapters": ["a", "b"], "method": "ties", **legacy}))
    with pytest.warns(DeprecationWarning, match=new_key):
        config = load_merge_config(path)
    assert check(config)


def test_config_errors_name_the_field(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("adapters: [a, b]\nmethod: ties\nsearch: {type: bayes}\n")
    with pytest.raises(ConfigError, match=r"search: Value error, search.type bayes needs search.space"):
        load_merge_config(path)
    path.write_text("adapters: [a\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_merge_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_merge_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("extra", [
    {"save_rank": "64"}, {"save_merged": 1}, {"eval_subset": {"max_samples": False}},
    {"lambda_policy": {"type": "per_layer", "overrides": {"0": "0.5"}}},
    {"adapters": ["a", ""]}, {"optimizer": 0}, {"params": "x"}, {"grid": [0.5]},
])
def test_values_are_not_coerced_and_odd_shapes_are_validation_errors(extra: dict) -> None:
    """What the JSON schema refuses, the model refuses too (a ValidationError, never a crash)."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        MergeConfig.model_validate({"adapters": ["a", "b"], "method": "ties", **extra})


def test_the_json_schema_states_the_rules_between_keys() -> None:
    schema = MergeConfig.model_json_schema()
    search = schema["$defs"]["SearchConfig"]["allOf"]
    assert search[0]["then"]["required"] == ["space"] and search[0]["else"]["required"] == ["grid"]
    assert schema["$defs"]["LambdaPolicyConfig"]["then"]["required"] == ["type"]
    assert all(schema["properties"][key]["deprecated"] for key in ("lambda", "params", "grid"))
    # layer indices arrive as JSON object keys, i.e. strings
    policy = MergeConfig.model_validate({"adapters": ["a", "b"], "method": "ties", "lambda_policy": {
        "type": "per_layer", "overrides": {"3": 0.5}}}).lambda_policy
    assert policy.overrides == {3: 0.5}
