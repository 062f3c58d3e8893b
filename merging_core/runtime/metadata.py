"""Run metadata helpers."""

from __future__ import annotations

import platform
from importlib import metadata as importlib_metadata
from typing import Any


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("lora-merge-service", "torch", "transformers", "peft", "safetensors", "pydantic"):
        try:
            versions[package] = importlib_metadata.version(package)
        except importlib_metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def summarize(metadata: dict[str, Any]) -> dict[str, Any]:
    """The short `summary.json` of a run."""
    saved = metadata.get("saved") or {}
    return {
        "run_id": metadata["run_id"],
        "method": metadata["method"],
        "merge_tag": metadata["merge_tag"],
        "adapters": [a["name"] for a in metadata["adapters"]],
        "params": metadata["params"],
        "num_modules": metadata["num_modules"],
        "left_out": metadata["left_out"],
        "saved": bool(saved),
        "save_rank": saved.get("rank"),
        "svd_relative_error_max": saved.get("svd_relative_error_max"),
        "duration_s": metadata["duration_s"],
    }
