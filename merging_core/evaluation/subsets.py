"""Deterministic evaluation subsets (the seed's `eval_subset`), cached on disk.

Indices depend only on (task, split, seed, shuffle, stratified, max_samples) and the data, so
they are identical across runs and processes; the cache file records a checksum of the data and
is rebuilt if the data changed. Results on a subset are namespaced by its tag.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from merging_core.config.schema import EvalSubsetConfig
from merging_core.evaluation.data import TaskData
from merging_core.runtime.io import atomic_write_json
from merging_core.runtime.paths import subset_file


@dataclass(frozen=True)
class SubsetSpec:
    """The effective subset settings for one task."""

    seed: int
    shuffle: bool
    stratified: bool
    max_samples: int | None

    @property
    def tag(self) -> str:
        parts = [f"n{self.max_samples or 'all'}", f"seed{self.seed}"]
        if self.shuffle:
            parts.append("shuf")
        if self.stratified:
            parts.append("strat")
        return "subset_" + "_".join(parts)


def subset_spec(config: EvalSubsetConfig | None, task: str) -> SubsetSpec | None:
    """Apply the per-task override; None means the full split."""
    if config is None or not config.enabled:
        return None
    override = config.per_task.get(task)
    pick = lambda name: (  # noqa: E731
        getattr(override, name) if override and getattr(override, name) is not None
        else getattr(config, name)
    )
    return SubsetSpec(
        seed=pick("seed"), shuffle=pick("shuffle"), stratified=pick("stratified"),
        max_samples=pick("max_samples"),
    )


def select_indices(data: TaskData, spec: SubsetSpec, key: str) -> list[int]:
    """Pick the subset; `key` (task/split) decorrelates tasks that share a seed."""
    rng = random.Random(f"{spec.seed}:{key}")  # str seeds hash with sha512: stable everywhere
    count = len(data)
    limit = count if spec.max_samples is None else min(spec.max_samples, count)
    if spec.stratified and data.labels is not None:
        by_label: dict[str, list[int]] = defaultdict(list)
        for index, label in enumerate(data.labels):
            by_label[label].append(index)
        labels = sorted(by_label)
        exact = {label: limit * len(by_label[label]) / count for label in labels}
        quota = {label: int(exact[label]) for label in labels}
        # Largest remainders get the leftover slots, ties broken by label name.
        leftover = limit - sum(quota.values())
        for label in sorted(labels, key=lambda lab: (-(exact[lab] - quota[lab]), lab))[:leftover]:
            quota[label] += 1
        chosen = []
        for label in labels:
            members = list(by_label[label])
            if spec.shuffle:
                rng.shuffle(members)
            chosen.extend(members[: quota[label]])
        return sorted(chosen)
    indices = list(range(count))
    if spec.shuffle:
        rng.shuffle(indices)
    return sorted(indices[:limit])


def subset_indices(
    data: TaskData, spec: SubsetSpec, *, task: str, split: str, artifacts_dir: Path
) -> list[int]:
    """Cached `select_indices` (`runtime.paths.subset_file`)."""
    path = subset_file(artifacts_dir, task, split, spec.tag)
    checksum = data.checksum()
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("data_checksum") == checksum:
            return list(cached["indices"])
    indices = select_indices(data, spec, f"{task}/{split}")
    atomic_write_json(path, {"task": task, "split": split, "tag": spec.tag, "data_checksum": checksum,
                             "indices": indices})
    return indices


def subset_namespace(config: EvalSubsetConfig | None) -> str | None:
    """The directory that keeps subset results apart from full-split ones (None: full split)."""
    if config is None or not config.enabled:
        return None
    canonical = json.dumps(config.model_dump(mode="json"), sort_keys=True)
    digest = hashlib.sha1(canonical.encode()).hexdigest()[:8]
    return f"subset_n{config.max_samples or 'all'}_seed{config.seed}_{digest}"
