"""Does merging work here? Merge results on the demo workspace, measured end to end.

Rows: each task's own adapter alone (evaluated on every task), uniform, task_vector at its best
lambda, ties, dare_ties, the best point of a bayes sweep over weighted_delta's per-adapter
weights (and AdaMerging when `--adamerging` is given). Columns: each task's test accuracy, its
interference delta (merged - the task's own adapter), the min-delta objective and the mean
accuracy.

Coefficients are chosen on a stratified subset of the *train* split (never on test), then the
chosen merge is evaluated on the full test split.

    .venv/bin/python bench/demo_results.py            # prints the table
    .venv/bin/python bench/demo_results.py --write    # also writes bench/results/demo_results.md

No number in the table is typed by hand; the README's results table is this file's output.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from tempfile import mkdtemp

# Before torch: importing common puts the checkout on sys.path and Hugging Face offline.
from common import (RESULTS_DIR, ROOT, publish, replace_marked_block, setup_logging, utc_stamp,
                    versions_line)

import torch

from merging_core import run_merge
from merging_core.config import EvalSubsetConfig, parse_merge_config
from merging_core.evaluation.evaluate import EvalSession, EvaluationResult
from merging_core.search import run_sweep
from merging_core.evaluation.workspace import load_workspace

TASKS = ["intent", "banking", "sentiment"]
RESULTS = RESULTS_DIR / "demo_results.md"
SELECTION = EvalSubsetConfig(max_samples=300, stratified=True, seed=0)
TASK_VECTOR_LAMBDAS = [0.1, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7, 0.85, 1.0, 1.2]


@dataclass
class Row:
    name: str
    detail: str
    result: EvaluationResult

    def cells(self) -> list[str]:
        accuracy = [f"{self.result.tasks[t].merged.primary:.4f}" for t in TASKS]
        deltas = [f"{self.result.tasks[t].interference_delta:+.4f}" for t in TASKS]
        mean = sum(self.result.tasks[t].merged.primary for t in TASKS) / len(TASKS)
        return [self.name, self.detail, *accuracy, *deltas, f"{self.result.objective:+.4f}", f"{mean:.4f}"]


def evaluate_config(session: EvalSession, config: dict, split: str = "test",
                    subset: EvalSubsetConfig | None = None) -> EvaluationResult:
    merged = run_merge(config, task_registry=session.workspace.task_registry(), artifacts_dir=session.root)
    return session.evaluate_merge(merged.output, merge_tag=merged.merge_tag, tasks=TASKS, split=split,
                                  subset=subset, run_dir=merged.run_dir)


def best_task_vector(session: EvalSession) -> float:
    """The task_vector lambda with the best mean accuracy on the train selection subset (the
    scalar rival AdaMerging has to beat; ties go to the better min-delta)."""
    scores = {}
    for lam in TASK_VECTOR_LAMBDAS:
        result = evaluate_config(session, {"adapters": TASKS, "method": "task_vector",
                                           "method_params": {"lambda": lam}}, "train", SELECTION)
        mean = sum(result.tasks[t].merged.primary for t in TASKS) / len(TASKS)
        scores[lam] = (mean, result.objective)
        logging.info("task_vector lambda=%s train-subset mean acc %.4f, objective %.4f", lam, mean,
                     result.objective)
    return max(scores, key=lambda lam: scores[lam])


def best_bayes_point(session: EvalSession, budget: int) -> list[float]:
    config = parse_merge_config({
        "adapters": TASKS, "method": "weighted_delta", "split": "train",
        "eval_subset": SELECTION.model_dump(),
        "search": {"type": "bayes", "budget": budget, "init_points": min(8, budget), "seed": 0,
                   "space": {"lambda": {"min": 0.0, "max": 1.5, "per_adapter": True}}},
    })
    result = run_sweep(config, session)
    return list(result.best.method_params["lambda"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"write {RESULTS.relative_to(ROOT)}")
    parser.add_argument("--budget", type=int, default=20, help="bayes sweep trials")
    parser.add_argument("--artifacts", type=Path, default=None, help="artifacts dir (default: temp)")
    parser.add_argument("--adamerging", action="store_true", help="add an AdaMerging row")
    args = parser.parse_args()
    setup_logging(quiet_libraries=False)
    torch.manual_seed(0)
    started = time.perf_counter()
    artifacts = args.artifacts or Path(mkdtemp(prefix="demo_results_"))
    session = EvalSession.from_workspace(load_workspace(ROOT / "workspaces/demo/workspace.yaml"),
                                         artifacts, device="cpu")
    rows: list[Row] = []
    for task in TASKS:
        result = session.evaluate_merge(session.task_output(task), merge_tag=f"single_{task}",
                                        tasks=TASKS, layout=("single", [task]))
        rows.append(Row(f"{task} adapter alone", "its own LoRA, each task's head", result))
    rows.append(Row("uniform", "mean of deltas", evaluate_config(session, {"adapters": TASKS, "method": "uniform"})))
    lam = best_task_vector(session)
    rows.append(Row("task_vector", f"lambda={lam:g} (best mean acc on train subset, {len(TASK_VECTOR_LAMBDAS)} tried)",
                    evaluate_config(session, {"adapters": TASKS, "method": "task_vector",
                                              "method_params": {"lambda": lam}})))
    rows.append(Row("ties", "k=20, lambda=1", evaluate_config(session, {"adapters": TASKS, "method": "ties"})))
    rows.append(Row("dare_ties", "density=0.5, seed=0",
                    evaluate_config(session, {"adapters": TASKS, "method": "dare_ties"})))
    weights = best_bayes_point(session, args.budget)
    rows.append(Row("bayes sweep best", "weighted_delta, lambda=[" + ", ".join(f"{w:.2f}" for w in weights)
                    + f"] ({args.budget} trials on train subset)",
                    evaluate_config(session, {"adapters": TASKS, "method": "weighted_delta",
                                              "method_params": {"lambda": weights}})))
    if args.adamerging:
        rows.append(adamerging_row(session))

    header = ["merge", "setting", *[f"{t} acc" for t in TASKS], *[f"{t} delta" for t in TASKS],
              "min delta", "mean acc"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row.cells()) + " |" for row in rows),
    ]
    minutes = (time.perf_counter() - started) / 60
    note = (f"Demo workspace, full test splits (intent 700, banking 3,080, sentiment 600); "
            f"CPU, {torch.get_num_threads()} threads, {versions_line('torch')}; {minutes:.1f} min; "
            f"generated {utc_stamp('%Y-%m-%d')} by `bench/demo_results.py`.")
    publish("\n".join(lines) + "\n\n" + note, RESULTS if args.write else None)
    if args.write:
        record_adapter_accuracies({task: rows[i].result.tasks[task].reference for i, task in enumerate(TASKS)})


def record_adapter_accuracies(references: dict) -> None:  # type: ignore[type-arg]
    """Rewrite the accuracy table in workspaces/demo/README.md (between its markers)."""
    lines = ["| adapter | test accuracy | macro-F1 | test examples |", "|---|---|---|---|"]
    for task, metrics in references.items():
        lines.append(f"| `{task}` adapter | {metrics.metrics['accuracy']:.4f} | "
                     f"{metrics.metrics['macro_f1']:.4f} | {metrics.num_samples} |")
    replace_marked_block(ROOT / "workspaces" / "demo" / "README.md", "<!-- accuracies:start -->",
                         "<!-- accuracies:end -->", lines)


def adamerging_row(session: EvalSession) -> Row:
    """AdaMerging's learned per-layer lambdas (issue: optimizer `adamerging`)."""
    config = {"adapters": TASKS, "method": "weighted_delta", "method_params": {"lambda": [1.0, 1.0, 1.0]},
              "optimizer": {"name": "adamerging", "params": {"steps": 60}}}
    merged = run_merge(config, task_registry=session.workspace.task_registry(), artifacts_dir=session.root,
                       session=session)
    result = session.evaluate_merge(merged.output, merge_tag=merged.merge_tag, tasks=TASKS, run_dir=merged.run_dir)
    return Row("adamerging", "per-layer lambdas learned by entropy minimisation", result)


if __name__ == "__main__":
    main()
