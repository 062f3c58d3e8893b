"""The writer of evaluation results: eval dirs, per-task files and links, and the index.

Evaluation (`EvalSession.evaluate_merge`) computes an `EvaluationResult`; this writer puts it
into the seed's layout (paths from `runtime.paths`):

    <root>/merged/<method>/<combo>/eval/<split>[/<subset>]/eval_results_<tag>_<split>.json
    <root>/merged/<method>/<combo>/eval/<split>[/<subset>]/per_task/<task>/<task>_<tag>_metrics.json
    <root>/merged/<method>/<combo>/eval/index.json                       (append-only)
    <root>/<task>/metrics/eval/<split>[/<subset>]/merged/<others>/<tag>/metrics.json -> per_task file
    <run_dir>/eval_results_<split>.json                                   (when the merge has a run)

Keeping it apart from the evaluator lets one process own every write while others compute.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from merging_core.evaluation.results import EvaluationResult
from merging_core.runtime.index import update_results_index
from merging_core.runtime.io import atomic_write_json, to_jsonable
from merging_core.runtime.paths import (
    eval_dir,
    eval_results_file,
    index_file,
    merged_metrics_link,
    per_task_file,
    run_eval_results_file,
)

# index_listener(index_path, entry): called after each index append (e.g. a database mirror).
IndexListener = Callable[[Path, dict[str, Any]], None]
_INDEXED_EXTRA = ("sweep_id", "trial", "job_id")


class EvalWriter:
    """Writes evaluation results under one artifacts root."""

    def __init__(self, root: str | Path, index_listener: IndexListener | None = None) -> None:
        self.root = Path(root)
        self.index_listener = index_listener

    def write(self, result: EvaluationResult, run_dir: Path | None = None) -> Path:
        """Write every output of `result`; returns (and records in it) the results file."""
        directory = eval_dir(self.root, result.method, result.adapters, result.split, result.subset)
        created_at = datetime.now(timezone.utc).isoformat()
        payload = {**result.to_dict(), "created_at": created_at, "params": result.params,
                   "lambda_policy": result.lambda_policy}
        results_file = eval_results_file(directory, result.merge_tag, result.split)
        atomic_write_json(results_file, payload)
        result.results_file = results_file
        if run_dir is not None:
            atomic_write_json(run_eval_results_file(run_dir, result.split), payload)
        for task, task_result in result.tasks.items():
            per_task = per_task_file(directory, task, result.merge_tag)
            atomic_write_json(per_task, task_result.to_dict())
            others = [a for a in result.adapters if a != task] or [task]
            link = merged_metrics_link(self.root, task, result.split, result.subset, others,
                                       result.merge_tag)
            link.parent.mkdir(parents=True, exist_ok=True)
            temp_link = link.with_name(f".metrics.json.{uuid.uuid4().hex[:8]}")
            os.symlink(os.path.relpath(per_task, link.parent), temp_link)
            os.replace(temp_link, link)
        entry = {
            "id": result.id,
            "created_at": created_at,
            "method": result.method,
            "merge_tag": result.merge_tag,
            "adapters": result.adapters,
            "params": to_jsonable(result.params),
            "lambda_policy": result.lambda_policy,
            "split": result.split,
            "subset": result.subset,
            "eval_tasks": list(result.tasks),
            "metrics": result.metrics,
            "interference_delta": result.deltas,
            "objective_min_delta": result.objective,
            "results_file": str(results_file.relative_to(self.root)),
            "run_id": Path(run_dir).name if run_dir else None,
            **{k: v for k, v in result.extra.items() if k in _INDEXED_EXTRA},
        }
        index_path = index_file(self.root, result.method, result.adapters)
        update_results_index(index_path, entry)
        if self.index_listener is not None:
            self.index_listener(index_path, entry)
        return results_file
