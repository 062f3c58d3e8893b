"""Load a merge config from YAML (or JSON) with clear errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from merging_core.config.schema import MergeConfig
from merging_core.errors import ConfigError


def format_validation_error(exc: ValidationError, source: str, what: str = "merge config") -> str:
    problems = []
    for error in exc.errors():
        location = ".".join(str(part) for part in error["loc"]) or "(top level)"
        problems.append(f"{location}: {error['msg']}")
    return f"invalid {what} {source}: " + "; ".join(problems)


def parse_merge_config(data: Any, source: str = "(inline)") -> MergeConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"merge config {source} must be a mapping, got {type(data).__name__}")
    try:
        return MergeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def load_merge_config(path: str | Path) -> MergeConfig:
    """Read a merge or sweep config file; legacy keys load with a DeprecationWarning."""
    config_path = Path(path)
    if not config_path.is_file():
        raise ConfigError(f"merge config not found: {config_path}")
    try:
        data = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"merge config {config_path} is not valid YAML: {exc}") from None
    return parse_merge_config(data, str(config_path))
