"""The unified merge config: schema, legacy migration and loader."""

from merging_core.config.loader import load_merge_config, parse_merge_config
from merging_core.config.schema import (
    EvalSubsetConfig,
    LambdaPolicyConfig,
    MergeConfig,
    MergeSpec,
    PluginConfig,
    SearchConfig,
    migrate_legacy,
)

__all__ = [
    "EvalSubsetConfig",
    "LambdaPolicyConfig",
    "MergeConfig",
    "MergeSpec",
    "PluginConfig",
    "SearchConfig",
    "load_merge_config",
    "migrate_legacy",
    "parse_merge_config",
]
