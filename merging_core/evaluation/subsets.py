"""Deterministic evaluation subsets (the seed's `eval_subset`), cached on disk.

Indices depend only on (task, split, seed, shuffle, stratified, max_samples) and the data, so
they are identical across runs and processes; the cache file records a checksum of the data and
is rebuilt if the data changed. Results on a subset are namespaced by its tag.

Fidelity subsets (multi-fidelity sweeps, `FidelitySubsetConfig`) are prefixes of one fixed
order of the plain subset, so a larger one contains every smaller one. Plain subsets of
different sizes are not always nested when stratified: each label's share is rounded by
largest remainders, and a label can get fewer rows at a larger size (the Alabama paradox). The
fixed order interleaves the labels by Sainte-Lague's divisors (the next row goes to the label
with the largest `rows / (2 * taken + 1)`), which never takes a row away as the prefix grows
and, at the full length, gives every label exactly its plain quota.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import random
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

from pydantic import Field

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
    fidelity: int | None = None  # the first `fidelity` rows of the subset's fixed order

    @property
    def tag(self) -> str:
        size = f"n{self.max_samples or 'all'}"
        if self.fidelity is not None:
            size = f"n{self.fidelity}of{self.max_samples or 'all'}"
        parts = [size, f"seed{self.seed}"]
        if self.shuffle:
            parts.append("shuf")
        if self.stratified:
            parts.append("strat")
        return "subset_" + "_".join(parts)


class FidelitySubsetConfig(EvalSubsetConfig):
    """The first `fidelity` rows of an eval subset's fixed order: one rung of a multi-fidelity
    sweep. Built by the sweep, not written by users."""

    fidelity: int = Field(ge=1, description="rows per task: a prefix of the subset's fixed order")


def subset_spec(config: EvalSubsetConfig | None, task: str) -> SubsetSpec | None:
    """Apply the per-task override; None means the full split."""
    if config is None or not config.enabled:
        return None
    override = config.per_task.get(task)
    pick = lambda name: (
        getattr(override, name) if override and getattr(override, name) is not None
        else getattr(config, name)
    )
    return SubsetSpec(
        seed=pick("seed"), shuffle=pick("shuffle"), stratified=pick("stratified"),
        max_samples=pick("max_samples"),
        fidelity=config.fidelity if isinstance(config, FidelitySubsetConfig) else None,
    )


def select_indices(data: TaskData, spec: SubsetSpec, key: str) -> list[int]:
    """Pick the subset (a fidelity: the first `fidelity` rows of its fixed order), sorted;
    `key` (task/split) decorrelates tasks that share a seed."""
    order = subset_order(data, replace(spec, fidelity=None), key)
    return sorted(order if spec.fidelity is None else order[: spec.fidelity])


def _sainte_lague(groups: list[list[int]]) -> list[int]:
    """The groups' members interleaved: the next one comes from the group with the largest
    `len(group) / (2 * taken + 1)` (ties: the earlier group), each group in its own order."""
    heap = [(-len(members), g, 0) for g, members in enumerate(groups) if members]
    heapq.heapify(heap)
    order = []
    while heap:
        _, g, taken = heapq.heappop(heap)
        order.append(groups[g][taken])
        if taken + 1 < len(groups[g]):
            heapq.heappush(heap, (-len(groups[g]) / (2 * taken + 3), g, taken + 1))
    return order


def subset_order(data: TaskData, spec: SubsetSpec, key: str) -> list[int]:
    """The plain subset's rows in a fixed order whose every prefix is nested in the longer
    ones (stratified: near-proportional per label; the whole order is exactly the subset)."""
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
            chosen.append(members[: quota[label]])
        return _sainte_lague(chosen)
    indices = list(range(count))
    if spec.shuffle:
        rng.shuffle(indices)
    return indices[:limit]


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
    size = f"n{config.max_samples or 'all'}"
    if isinstance(config, FidelitySubsetConfig):
        size = f"n{config.fidelity}of{config.max_samples or 'all'}"
    return f"subset_{size}_seed{config.seed}_{digest}"
