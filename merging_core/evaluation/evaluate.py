"""Evaluate merges on the resident model, compare with each task's own adapter, record results.

An `EvalSession` belongs to one worker: it owns the model holder, caches task data, heads,
loaded adapters and reference metrics, and writes the seed's evaluation layout:

    <root>/merged/<method>/<combo>/eval/<split>[/<subset>]/eval_results_<tag>_<split>.json
    <root>/merged/<method>/<combo>/eval/<split>[/<subset>]/per_task/<task>/<task>_<tag>_metrics.json
    <root>/merged/<method>/<combo>/eval/index.json                       (append-only)
    <root>/<task>/metrics/eval/<split>[/<subset>]/merged/<others>/<tag>/metrics.json -> per_task file
    <root>/<task>/metrics/eval/<split>[/<subset>]/reference/metrics.json (the task's own adapter)
    <root>/<task>/metrics/eval/<split>[/<subset>]/base/metrics.json      (the base model)

`interference_delta[t]` = merged - reference for higher-is-better metrics and reference - merged
for lower-is-better ones, so positive always means the merge is better than the task's own
adapter. `normalized[t]` = merged / reference (reference / merged when lower is better).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from merging_core.adapters import LoraAdapter
from merging_core.config.schema import EvalSubsetConfig
from merging_core.engine.merge import MergeOutput
from merging_core.engine.runner import prepare_merge
from merging_core.errors import EvaluationError
from merging_core.evaluation.cancel import CancelToken, Progress, check, report
from merging_core.evaluation.data import TaskData, load_task_data
from merging_core.evaluation.evaluators import EvalContext, EvalMetrics, get_evaluator
from merging_core.evaluation.holder import ModelHolder
from merging_core.evaluation.index import update_results_index
from merging_core.evaluation.subsets import subset_indices, subset_spec
from merging_core.evaluation.workspace import Workspace
from merging_core.runtime.io import atomic_write_json, to_jsonable
from merging_core.runtime.paths import merged_dir, safe_component, task_combo

log = logging.getLogger(__name__)


def interference_delta(merged: float, reference: float, direction: str) -> float:
    return merged - reference if direction == "higher" else reference - merged


def normalized_score(merged: float, reference: float, direction: str) -> float | None:
    numerator, denominator = (merged, reference) if direction == "higher" else (reference, merged)
    return numerator / denominator if denominator else None


def subset_namespace(config: EvalSubsetConfig | None) -> str | None:
    """The directory that keeps subset results apart from full-split ones (None: full split)."""
    if config is None or not config.enabled:
        return None
    canonical = json.dumps(config.model_dump(mode="json"), sort_keys=True)
    digest = hashlib.sha1(canonical.encode()).hexdigest()[:8]
    return f"subset_n{config.max_samples or 'all'}_seed{config.seed}_{digest}"


@dataclass
class TaskResult:
    task: str
    merged: EvalMetrics
    reference: EvalMetrics
    base: EvalMetrics | None
    interference_delta: float
    normalized: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "metric": self.merged.primary_metric,
            "direction": self.merged.direction,
            "merged": self.merged.to_dict(),
            "reference": self.reference.to_dict(),
            "base": self.base.to_dict() if self.base else None,
            "interference_delta": self.interference_delta,
            "normalized": self.normalized,
        }


@dataclass
class EvaluationResult:
    id: str
    merge_tag: str
    method: str
    adapters: list[str]
    split: str
    subset: str | None
    tasks: dict[str, TaskResult]
    results_file: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def objective(self) -> float:
        """Max-min ranking's objective: the worst task's interference delta."""
        return min(r.interference_delta for r in self.tasks.values())

    @property
    def metrics(self) -> dict[str, float]:
        return {t: r.merged.primary for t, r in self.tasks.items()}

    @property
    def deltas(self) -> dict[str, float]:
        return {t: r.interference_delta for t, r in self.tasks.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "merge_tag": self.merge_tag,
            "method": self.method,
            "adapters": self.adapters,
            "split": self.split,
            "subset": self.subset,
            "objective_min_delta": self.objective,
            "metrics": self.metrics,
            "interference_delta": self.deltas,
            "tasks": {t: r.to_dict() for t, r in self.tasks.items()},
            **self.extra,
        }


class EvalSession:
    """Evaluation on one resident model, with caches; one per worker."""

    def __init__(
        self,
        workspace: Workspace,
        holder: ModelHolder,
        artifacts_dir: str | Path,
        *,
        index_listener: Callable[[Path, dict[str, Any]], None] | None = None,
    ) -> None:
        """`index_listener(index_path, entry)` is called after each index append (e.g. to
        mirror the index into a database)."""
        self.workspace = workspace
        self.holder = holder
        self.root = Path(artifacts_dir)
        self.index_listener = index_listener
        self.adapter_cache: dict[str, LoraAdapter] = {}
        self._data: dict[tuple[str, str], TaskData] = {}
        self._labels: dict[str, list[str]] = {}
        self._cache_keys: dict[tuple[str, str, str, str | None], str] = {}

    @classmethod
    def from_workspace(
        cls,
        workspace: Workspace,
        artifacts_dir: str | Path,
        *,
        device: str | None = None,
        dtype: str | None = None,
        index_listener: Callable[[Path, dict[str, Any]], None] | None = None,
    ) -> EvalSession:
        base = workspace.spec.base_model
        holder = ModelHolder(
            workspace.base_model_path(), model_class=base.model_class, dtype=dtype or base.dtype,
            device=device or base.device,
        )
        return cls(workspace, holder, artifacts_dir, index_listener=index_listener)

    # --- data, labels, heads ---------------------------------------------------------------

    def _split_data(self, task: str, split: str) -> TaskData:
        key = (task, split)
        if key not in self._data:
            config = self.workspace.task(task)
            evaluator = get_evaluator(config.evaluator)
            self._data[key] = load_task_data(
                self.workspace.data_path(task, split),
                text_column=config.text_column,
                label_column=config.label_column if evaluator.needs_labels else None,
                reference_column=None if evaluator.needs_labels else config.reference_column,
            )
        return self._data[key]

    def labels(self, task: str) -> list[str]:
        """The head's label order: the workspace's `labels`, else sorted train labels."""
        if task not in self._labels:
            config = self.workspace.task(task)
            if config.labels is not None:
                self._labels[task] = list(config.labels)
            elif not get_evaluator(config.evaluator).needs_labels:
                self._labels[task] = []
            else:
                source = "train" if "train" in config.data else next(iter(config.data))
                self._labels[task] = sorted(set(self._split_data(task, source).labels or []))
        return self._labels[task]

    def task_data(
        self, task: str, split: str, subset: EvalSubsetConfig | None
    ) -> tuple[TaskData, str | None]:
        data = self._split_data(task, split)
        spec = subset_spec(subset, task)
        if spec is None:
            return data, None
        indices = subset_indices(data, spec, task=task, split=split, cache_dir=self.root / "subsets")
        return data.select(indices), spec.tag

    def adapter(self, task: str) -> LoraAdapter:
        output = self.task_output(task)
        return output.adapters[0]

    def task_output(self, task: str) -> MergeOutput:
        """Task t's own adapter as a merge of one (delta = its LoRA delta exactly)."""
        return prepare_merge(
            {"adapters": [task], "method": "task_vector"},
            task_registry=self.workspace.task_registry(),
            adapter_cache=self.adapter_cache,
        )

    def saved_output(self, adapter_dir: str | Path) -> tuple[MergeOutput, dict[str, Any]]:
        """A saved adapter (e.g. a run bundle) as a merge of one, plus its run metadata if any.

        It is applied through the same holder as in-memory merges: nothing reloads the base.
        """
        path = Path(adapter_dir)
        output = prepare_merge({"adapters": [str(path)], "method": "task_vector"},
                               adapter_cache=self.adapter_cache)
        metadata_file = path / "merge_metadata.json"
        metadata = json.loads(metadata_file.read_text()) if metadata_file.is_file() else {}
        return output, metadata

    def evaluate_saved(self, adapter_dir: str | Path, **kwargs: Any) -> EvaluationResult:
        """Evaluate a saved adapter; results land beside the merge it came from, if known."""
        output, metadata = self.saved_output(adapter_dir)
        names = [a["name"] for a in metadata.get("adapters", [])] or output.adapter_names
        if not kwargs.get("tasks"):
            kwargs["tasks"] = [n for n in names if n in self.workspace.tasks] or None
        return self.evaluate_merge(
            output,
            merge_tag=f"saved_{metadata.get('merge_tag', Path(adapter_dir).name)}",
            layout=(metadata.get("method", "saved"), names),
            run_dir=Path(adapter_dir) if metadata else None,
            **kwargs,
        )

    def head(self, task: str) -> dict[str, torch.Tensor]:
        heads = self.adapter(task).heads
        if not heads and self.holder.model_class == "sequence_classification":
            raise EvaluationError(
                f"task {task!r}: its adapter has no classification head (modules_to_save); "
                "sequence classification needs the task's own head"
            )
        return heads

    # --- evaluation --------------------------------------------------------------------------

    def evaluate_task(
        self,
        task: str,
        split: str,
        subset: EvalSubsetConfig | None,
        *,
        cancel: CancelToken | None = None,
        progress: Progress | None = None,
    ) -> EvalMetrics:
        """Evaluate whatever weights are applied now, with task t's own head."""
        config = self.workspace.task(task)
        data, _ = self.task_data(task, split, subset)
        context = EvalContext(
            holder=self.holder, task=config, data=data, labels=self.labels(task), cancel=cancel,
            progress=progress,
        )
        with self.holder.head(self.head(task)):
            return get_evaluator(config.evaluator).evaluate(context)

    def evaluate_output(
        self,
        output: MergeOutput | None,
        tasks: Sequence[str],
        split: str,
        subset: EvalSubsetConfig | None,
        *,
        cancel: CancelToken | None = None,
        progress: Progress | None = None,
    ) -> dict[str, EvalMetrics]:
        """Apply the merge once, evaluate every task, restore (also on error or cancel)."""
        results: dict[str, EvalMetrics] = {}
        with self.holder.applied(output, cancel):
            for done, task in enumerate(tasks):
                check(cancel)
                report(progress, done, len(tasks), f"evaluating {task}")
                results[task] = self.evaluate_task(task, split, subset, cancel=cancel)
        report(progress, len(tasks), len(tasks), "evaluated")
        return results

    def _cached_metrics(
        self, kind: str, task: str, split: str, subset: EvalSubsetConfig | None, key: str,
        output: MergeOutput | None, cancel: CancelToken | None,
    ) -> EvalMetrics:
        namespace = subset_namespace(subset)
        directory = self.root / safe_component(task) / "metrics" / "eval" / split
        path = (directory / namespace if namespace else directory) / kind / "metrics.json"
        if path.is_file():
            cached = json.loads(path.read_text())
            if cached.get("key") == key:
                return EvalMetrics.from_dict(cached["metrics"])
        metrics = self.evaluate_output(output, [task], split, subset, cancel=cancel)[task]
        atomic_write_json(path, {"task": task, "split": split, "subset": namespace, "kind": kind,
                                 "key": key, "metrics": metrics.to_dict()})
        return metrics

    def reference(
        self, task: str, split: str, subset: EvalSubsetConfig | None,
        cancel: CancelToken | None = None,
    ) -> EvalMetrics:
        """Task t's own adapter on (split, subset): computed once, cached on disk."""
        key = self._cache_key("reference", task, split, subset)
        return self._cached_metrics("reference", task, split, subset, key, self.task_output(task), cancel)

    def base_metrics(
        self, task: str, split: str, subset: EvalSubsetConfig | None,
        cancel: CancelToken | None = None,
    ) -> EvalMetrics:
        """The base model with task t's head: no LoRA delta at all."""
        key = self._cache_key("base", task, split, subset)
        return self._cached_metrics("base", task, split, subset, key, None, cancel)

    def _cache_key(self, kind: str, task: str, split: str, subset: EvalSubsetConfig | None) -> str:
        """What a cached reference or base metric depends on: the task's adapter file (its head
        too), the base model and dtype, the task's settings, and the evaluated rows."""
        memo = (kind, task, split, subset_namespace(subset))
        if memo not in self._cache_keys:
            adapter = self.adapter(task)
            data, _ = self.task_data(task, split, subset)
            self._cache_keys[memo] = hashlib.sha256(json.dumps([
                kind, adapter.checksums.get("adapter_model.safetensors", ""), str(self.holder.model_path),
                str(self.holder.dtype), self.workspace.task(task).model_dump(mode="json"), data.checksum(),
            ], sort_keys=True).encode()).hexdigest()
        return self._cache_keys[memo]

    def evaluate_merge(
        self,
        output: MergeOutput,
        *,
        merge_tag: str,
        tasks: Sequence[str] | None = None,
        split: str = "test",
        subset: EvalSubsetConfig | None = None,
        run_dir: Path | None = None,
        entry_id: str | None = None,
        record: Mapping[str, Any] | None = None,
        with_base: bool = True,
        write: bool = True,
        layout: tuple[str, list[str]] | None = None,
        cancel: CancelToken | None = None,
        progress: Progress | None = None,
    ) -> EvaluationResult:
        """Evaluate a merge on `tasks` (default: the merged adapters that are workspace tasks),
        compute interference against each task's own adapter, and write every output.

        `layout` = (method, adapter names) files the results under another merge's directory
        (used for saved adapters)."""
        tasks = list(tasks) if tasks else [n for n in output.adapter_names if n in self.workspace.tasks]
        if not tasks:
            raise EvaluationError(
                "no task to evaluate: give eval_tasks, or merge adapters named by workspace tasks"
            )
        for task in tasks:
            self.workspace.task(task)  # unknown task -> ConfigError naming the known ones
        merged = self.evaluate_output(output, tasks, split, subset, cancel=cancel, progress=progress)
        results = {}
        for task in tasks:
            reference = self.reference(task, split, subset, cancel)
            base = self.base_metrics(task, split, subset, cancel) if with_base else None
            direction = merged[task].direction
            results[task] = TaskResult(
                task=task,
                merged=merged[task],
                reference=reference,
                base=base,
                interference_delta=interference_delta(merged[task].primary, reference.primary, direction),
                normalized=normalized_score(merged[task].primary, reference.primary, direction),
            )
        method, adapter_names = layout or (output.method.name, output.adapter_names)
        result = EvaluationResult(
            id=entry_id or uuid.uuid4().hex,
            merge_tag=merge_tag,
            method=method,
            adapters=list(adapter_names),
            split=split,
            subset=subset_namespace(subset),
            tasks=results,
            extra=dict(record or {}),
        )
        if write:
            self._write(output, result, run_dir)
        return result

    def _write(self, output: MergeOutput, result: EvaluationResult, run_dir: Path | None) -> None:
        combo_dir = merged_dir(self.root, result.method, result.adapters)
        eval_dir = combo_dir / "eval" / result.split
        if result.subset:
            eval_dir = eval_dir / result.subset
        tag = safe_component(result.merge_tag)
        payload = {**result.to_dict(), "created_at": datetime.now(timezone.utc).isoformat(),
                   "params": output.params, "lambda_policy": output.policy.describe(output.params.get("lambda"))}
        results_file = eval_dir / f"eval_results_{tag}_{result.split}.json"
        atomic_write_json(results_file, payload)
        result.results_file = results_file
        if run_dir is not None:
            atomic_write_json(Path(run_dir) / f"eval_results_{result.split}.json", payload)
        for task, task_result in result.tasks.items():
            per_task = eval_dir / "per_task" / task / f"{task}_{tag}_metrics.json"
            atomic_write_json(per_task, task_result.to_dict())
            others = [a for a in result.adapters if a != task] or [task]
            link_dir = self.root / safe_component(task) / "metrics" / "eval" / result.split
            if result.subset:
                link_dir = link_dir / result.subset
            link = link_dir / "merged" / task_combo(others) / tag / "metrics.json"
            link.parent.mkdir(parents=True, exist_ok=True)
            temp_link = link.with_name(f".metrics.json.{uuid.uuid4().hex[:8]}")
            os.symlink(os.path.relpath(per_task, link.parent), temp_link)
            os.replace(temp_link, link)
        entry = {
            "id": result.id,
            "created_at": payload["created_at"],
            "method": result.method,
            "merge_tag": result.merge_tag,
            "adapters": result.adapters,
            "params": to_jsonable(output.params),
            "lambda_policy": payload["lambda_policy"],
            "split": result.split,
            "subset": result.subset,
            "eval_tasks": list(result.tasks),
            "metrics": result.metrics,
            "interference_delta": result.deltas,
            "objective_min_delta": result.objective,
            "results_file": str(results_file.relative_to(self.root)),
            "run_id": Path(run_dir).name if run_dir else None,
            **{k: v for k, v in result.extra.items() if k in ("sweep_id", "trial", "job_id")},
        }
        index_path = combo_dir / "eval" / "index.json"
        update_results_index(index_path, entry)
        if self.index_listener is not None:
            self.index_listener(index_path, entry)
