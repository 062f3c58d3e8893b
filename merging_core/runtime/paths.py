"""The seed's artifact layout: every path of it is built here and nowhere else.

    <root>/merged/<method>/<combo>/runs/run_YYYYMMDD_HHMMSS/            run bundles
    <root>/merged/<method>/<combo>/eval/<split>[/<subset>]/eval_results_<tag>_<split>.json
    <root>/merged/<method>/<combo>/eval/<split>[/<subset>]/per_task/<task>/<task>_<tag>_metrics.json
    <root>/merged/<method>/<combo>/eval/index.json                      append-only index
    <root>/merged/<method>/<combo>/sweeps/<sweep_id>.json|.png           summary and plot
    <root>/merged/<method>/<combo>/sweeps/<sweep_id>/trials/trial_NNNN.json
    <root>/<task>/metrics/eval/<split>[/<subset>]/{reference,base}/metrics.json   caches
    <root>/<task>/metrics/eval/<split>[/<subset>]/merged/<others>/<tag>/metrics.json -> per_task
    <root>/subsets/                                                     subset index caches
    <root>/grams/<task>/<key>/<module>.safetensors, manifest.json      RegMean Gram caches
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from merging_core.errors import ArtifactError

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_component(text: str) -> str:
    cleaned = _UNSAFE.sub("-", text).strip(".-")
    return cleaned or "x"


def task_combo(adapter_names: Sequence[str]) -> str:
    """`<task_combo>`: the adapter names, sorted, joined by `_` (the seed's `asr_intent`)."""
    return "_".join(safe_component(n) for n in sorted(adapter_names))


def merged_dir(root: Path, method: str, adapter_names: Sequence[str]) -> Path:
    return Path(root) / "merged" / safe_component(method) / task_combo(adapter_names)


def runs_dir(root: Path, method: str, adapter_names: Sequence[str]) -> Path:
    return merged_dir(root, method, adapter_names) / "runs"


RUN_ID_PATTERN = r"^run_\d{8}_\d{6}(_\d+)?$"


def find_run_dirs(root: Path, run_id: str) -> list[Path]:
    """Every run bundle named `run_id` under any method and combo (normally one)."""
    return sorted(Path(root).glob(f"merged/*/*/runs/{run_id}"))


# Inside a run bundle (the adapter's own files are PEFT's names: adapter_config.json, ...).
RUN_METADATA_FILE = "merge_metadata.json"
RUN_SUMMARY_FILE = "summary.json"
HEADS_DIR = "heads"


def run_eval_results_file(run_dir: Path, split: str) -> Path:
    return Path(run_dir) / f"eval_results_{split}.json"


def run_eval_results_files(run_dir: Path) -> dict[str, Path]:
    """A bundle's evaluation results by split."""
    return {path.stem.removeprefix("eval_results_"): path
            for path in sorted(Path(run_dir).glob("eval_results_*.json"))}


def head_file(run_dir: Path, adapter_name: str) -> Path:
    return Path(run_dir) / HEADS_DIR / f"{adapter_name}.safetensors"


def head_files(run_dir: Path) -> list[Path]:
    return sorted((Path(run_dir) / HEADS_DIR).glob("*.safetensors"))


def index_file(root: Path, method: str, adapter_names: Sequence[str]) -> Path:
    return merged_dir(root, method, adapter_names) / "eval" / "index.json"


def index_files(root: Path) -> list[Path]:
    """Every `eval/index.json` under the artifacts root, sorted."""
    return sorted(Path(root).glob("merged/*/*/eval/index.json"))


def eval_dir(root: Path, method: str, adapter_names: Sequence[str], split: str,
             subset: str | None) -> Path:
    directory = merged_dir(root, method, adapter_names) / "eval" / split
    return directory / subset if subset else directory


def eval_results_file(directory: Path, tag: str, split: str) -> Path:
    return directory / f"eval_results_{safe_component(tag)}_{split}.json"


def per_task_file(directory: Path, task: str, tag: str) -> Path:
    return directory / "per_task" / task / f"{task}_{safe_component(tag)}_metrics.json"


def task_metrics_dir(root: Path, task: str, split: str, subset: str | None) -> Path:
    directory = Path(root) / safe_component(task) / "metrics" / "eval" / split
    return directory / subset if subset else directory


def cached_metrics_file(root: Path, task: str, split: str, subset: str | None, kind: str) -> Path:
    """A task's cached `reference` (its own adapter) or `base` metrics."""
    return task_metrics_dir(root, task, split, subset) / kind / "metrics.json"


def merged_metrics_link(root: Path, task: str, split: str, subset: str | None,
                        others: Sequence[str], tag: str) -> Path:
    return (task_metrics_dir(root, task, split, subset) / "merged" / task_combo(others)
            / safe_component(tag) / "metrics.json")


def sweeps_dir(root: Path, method: str, adapter_names: Sequence[str]) -> Path:
    return merged_dir(root, method, adapter_names) / "sweeps"


def sweep_summary_file(root: Path, method: str, adapter_names: Sequence[str], sweep_id: str) -> Path:
    return sweeps_dir(root, method, adapter_names) / f"{sweep_id}.json"


def sweep_plot_file(root: Path, method: str, adapter_names: Sequence[str], sweep_id: str) -> Path:
    return sweeps_dir(root, method, adapter_names) / f"{sweep_id}.png"


def trial_file(root: Path, method: str, adapter_names: Sequence[str], sweep_id: str, index: int) -> Path:
    return sweeps_dir(root, method, adapter_names) / sweep_id / "trials" / f"trial_{index:04d}.json"


def subsets_dir(root: Path) -> Path:
    return Path(root) / "subsets"


def subset_file(root: Path, task: str, split: str, tag: str) -> Path:
    """The cached indices of one task's subset."""
    return subsets_dir(root) / task / split / f"{tag}.json"


def grams_dir(root: Path, task: str, key: str) -> Path:
    """One task's cached Gram matrices for one key (adapter, data, settings, base model)."""
    return Path(root) / "grams" / safe_component(task) / safe_component(key)


def gram_file(root: Path, task: str, key: str, module: str) -> Path:
    """The raw Gram matrix of one module's inputs."""
    return grams_dir(root, task, key) / f"{safe_component(module)}.safetensors"


def grams_manifest_file(root: Path, task: str, key: str) -> Path:
    """Written last: its presence says every module's Gram of the key is complete."""
    return grams_dir(root, task, key) / "manifest.json"


def merge_tag(method: str, params: dict[str, Any], extra: dict[str, Any] | None = None) -> str:
    """A readable, filename-safe tag for one merge configuration, unique by a short hash."""
    parts = [method]
    for key in sorted(params):
        value = params[key]
        if isinstance(value, float):
            value = f"{value:g}"
        elif isinstance(value, list):
            value = "-".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
        parts.append(f"{key}{value}")
    readable = safe_component("_".join(parts))[:80]
    canonical = json.dumps({"params": params, "extra": extra or {}}, sort_keys=True, default=str)
    digest = hashlib.sha1(canonical.encode()).hexdigest()[:8]
    return f"{readable}_{digest}"


def make_temp_run_dir(runs_root: Path) -> Path:
    """A private, hidden directory to build a run bundle in (see `publish_run_dir`)."""
    runs_root = Path(runs_root)
    try:
        runs_root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".tmp_run_", dir=runs_root))
    except OSError as exc:
        raise ArtifactError(f"cannot create a run directory under {runs_root}: {exc}") from exc


def claim_run_dir(runs_root: Path, now: datetime | None = None) -> Path:
    """Claim `runs/run_YYYYMMDD_HHMMSS` with an exclusive mkdir (an empty placeholder).

    Two runs in the same second get `_1`, `_2`, ... suffixes, so they never collide.
    """
    stamp = (now or datetime.now(UTC)).strftime("run_%Y%m%d_%H%M%S")
    for suffix in range(1000):
        final = Path(runs_root) / (stamp if suffix == 0 else f"{stamp}_{suffix}")
        try:
            final.mkdir()
        except FileExistsError:
            continue
        return final
    raise ArtifactError(f"too many runs in one second under {runs_root}")


def publish_run_dir(temp: Path, final: Path) -> None:
    """Atomically rename the finished bundle over its (empty) claimed placeholder."""
    temp.replace(final)


def discard_run_dir(temp: Path, final: Path | None = None) -> None:
    shutil.rmtree(temp, ignore_errors=True)
    if final is not None:
        shutil.rmtree(final, ignore_errors=True)
