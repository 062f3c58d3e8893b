"""Does merging work here? Merge results on a demo workspace, measured end to end.

`--workspace demo` (default): the text demo (all-MiniLM-L6-v2, a head per task), full test
splits. `--workspace causal`: the causal-LM workspace (SmolLM2-135M-Instruct, label likelihood),
on fixed stratified test subsets (300 rows for intent and sentiment, 154 for banking: full
Banking77 at 77 labels is hours on two cores).

Rows: the base model (causal only: the text demo's base has no task heads of its own), each
task's own adapter alone (evaluated on every task), uniform, task_vector at its best lambda,
ties, dare_ties, the best point of a bayes sweep over weighted_delta's per-adapter weights, and
the optional rows: RegMean (`--regmean`), RegMean++ (`--regmean-plus`), RegMean with task weights
chosen by optimizer bayes (`--regmean-weights`; with `--regmean-plus` also RegMean++ at those
weights), AdaMerging (`--adamerging`) and bayes over layer groups (`--layer-groups`); `--all`
adds the profile's optional rows. Columns: each task's test accuracy, its interference
delta (merged - the task's own adapter), the min-delta objective, the min normalised score
(merged over own adapter, worst task) and the mean accuracy.

Coefficients are chosen on a stratified subset of the *train* split (never on test), then the
chosen merge is evaluated on the test split (or its fixed subset).

    .venv/bin/python bench/demo_results.py                       # prints the demo table
    .venv/bin/python bench/demo_results.py --write               # also writes it into the README
    .venv/bin/python bench/demo_results.py --workspace causal --write

No number in the tables is typed by hand; the README's results tables are this file's output.

With `--artifacts DIR`, a rerun on the same DIR reads back the rows an earlier run finished
(`DIR/demo_results_rows/`, keyed by the workspace, the test subset and the row's settings), so a
crash in the last row costs that row only; the note's minutes add each row's recorded time.
Delete that folder to measure every row again.

`--add-to-table` computes only the optional rows the flags name and puts them into the table an
earlier run wrote (`bench/results/<workspace>_results.md`), replacing a row of the same name; the
other rows are read back from that table (4 decimals), and the note under it says which rows were
added, when, and in how many minutes. It is for the causal table, whose full run takes hours.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from tempfile import mkdtemp

import torch

# Before torch: importing common puts the checkout on sys.path and Hugging Face offline.
from common import (
    RESULTS_DIR,
    ROOT,
    publish,
    replace_marked_block,
    setup_logging,
    utc_stamp,
    versions_line,
)

from merging_core import run_merge
from merging_core.config import EvalSubsetConfig, parse_merge_config
from merging_core.evaluation.evaluate import EvalSession, EvaluationResult, interference_delta, normalized_score
from merging_core.evaluation.evaluators import EvalMetrics
from merging_core.evaluation.workspace import load_workspace
from merging_core.search import run_sweep

log = logging.getLogger("demo_results")
TEXT_TASKS = ("intent", "banking", "sentiment")
REGMEAN_WEIGHT_RANGE = (0.5, 3.0)  # each task weight's range in the regmean_weights row's search


@dataclass(frozen=True)
class Profile:
    """What differs between the two demo workspaces' tables."""

    workspace: Path
    tasks: tuple[str, ...]  # the adapters merged, and the tasks every row is evaluated on
    results: Path  # the report under bench/results/
    marker: str  # the README block between <!-- {marker}:start --> and <!-- {marker}:end -->
    test_subset: EvalSubsetConfig | None  # None: the full test split
    selection: EvalSubsetConfig  # the train subset coefficients are chosen on
    lambdas: tuple[float, ...]  # task_vector lambdas tried
    budget: int  # bayes sweep trials (default)
    base_row: bool
    describe: str  # the note under the table
    adamerging: dict  # AdaMerging's params (sized so that a run takes minutes on 2 cores)
    regmean_samples: int  # RegMean's samples_per_task
    regmean_grid: tuple[tuple[float, float], ...]  # (alpha, lambda) pairs RegMean's row chooses from on train
    regmean_plus_grid: tuple[tuple[float, float], ...]  # the same for RegMean++ (empty: no such row)
    regmean_weight_budget: int  # trials of optimizer bayes over RegMean's task weights (0: no such row)
    groups: int  # layer groups of the bayes-with-layer-groups row
    group_budget: int  # its trials
    optional_rows: tuple[str, ...] = ("regmean", "regmean_plus", "regmean_weights", "adamerging",
                                      "layer_groups")  # what --all adds
    mean_column: bool = True  # a mean over the tasks' primary metrics (all accuracies)


PROFILES = {
    "demo": Profile(
        workspace=ROOT / "workspaces/demo/workspace.yaml", tasks=TEXT_TASKS, results=RESULTS_DIR / "demo_results.md",
        marker="demo-results", test_subset=None,
        selection=EvalSubsetConfig(max_samples=300, stratified=True, seed=0),
        lambdas=(0.1, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7, 0.85, 1.0, 1.2), budget=20,
        base_row=False, describe="Demo workspace, full test splits (intent 700, banking 3,080, sentiment 600)",
        adamerging={"steps": 60}, regmean_samples=256, regmean_grid=((0.9, 1.0),),
        regmean_plus_grid=((0.9, 1.0), (1.0, 1.0)), regmean_weight_budget=30, groups=3, group_budget=40),
    "causal": Profile(
        workspace=ROOT / "workspaces/causal/workspace.yaml", tasks=TEXT_TASKS, results=RESULTS_DIR / "causal_results.md",
        marker="causal-results",
        test_subset=EvalSubsetConfig(max_samples=300, stratified=True, seed=0,
                                     per_task={"banking": {"max_samples": 154}}),
        selection=EvalSubsetConfig(max_samples=60, stratified=True, seed=0, per_task={"banking": {"max_samples": 40}}),
        lambdas=(0.3, 0.5, 0.7, 1.0), budget=10, base_row=True,
        describe=("Causal workspace (SmolLM2-135M-Instruct), fixed stratified test subsets (seed 0) of 300 "
                  "rows for intent and sentiment and 154 for banking (2 per label); coefficients chosen on "
                  "stratified train subsets of 60 rows (banking 40)"),
        adamerging={"steps": 30, "batch_size": 4, "samples_per_task": 64, "lr": 0.01},
        regmean_samples=128,
        regmean_grid=((0.5, 1.0), (0.7, 1.0), (0.9, 1.0)),
        # RegMean++ costs about L/2 forward passes per task here (30 layers): --regmean-plus only
        regmean_plus_grid=((0.9, 1.0),), regmean_weight_budget=12,
        optional_rows=("regmean", "regmean_weights", "adamerging", "layer_groups"), groups=3, group_budget=24),
    "speech": Profile(
        workspace=ROOT / "workspaces/speech/workspace.yaml", tasks=("asr", "intent"),
        results=RESULTS_DIR / "speech_results.md", marker="speech-results",
        test_subset=EvalSubsetConfig(max_samples=56, stratified=True, seed=0),
        selection=EvalSubsetConfig(max_samples=28, stratified=True, seed=0),
        lambdas=(0.5, 0.7, 1.0), budget=8, base_row=True,
        describe=("Speech workspace (Whisper tiny.en; espeak-ng voices reading SNIPS requests), a fixed "
                  "stratified test subset of 56 clips (8 per intent) for both tasks; coefficients chosen on a "
                  "stratified subset of 28 shipped train clips. WER: lower is better, so its delta is "
                  "reference - merged and its normalised score reference / merged"),
        adamerging={"steps": 20, "batch_size": 4, "samples_per_task": 28, "lr": 0.05},
        regmean_samples=0, regmean_grid=(), regmean_plus_grid=(), regmean_weight_budget=0, groups=0,
        group_budget=0,
        optional_rows=("adamerging",), mean_column=False),
}


@dataclass
class Row:
    name: str
    detail: str
    merged: dict[str, EvalMetrics]  # task -> this row's metrics
    reference: dict[str, EvalMetrics]  # task -> its own adapter's metrics
    chosen: dict | None = None  # type: ignore[type-arg]  # params chosen on train, for a later row to reuse

    @classmethod
    def of(cls, name: str, detail: str, result: EvaluationResult, chosen: dict | None = None) -> Row:  # type: ignore[type-arg]
        return cls(name, detail, {t: task.merged for t, task in result.tasks.items()},
                   {t: task.reference for t, task in result.tasks.items()}, chosen)

    def to_dict(self) -> dict:  # type: ignore[type-arg]
        return {"name": self.name, "detail": self.detail,
                "merged": {t: m.to_dict() for t, m in self.merged.items()},
                "reference": {t: m.to_dict() for t, m in self.reference.items()}, "chosen": self.chosen}

    @classmethod
    def from_dict(cls, data: dict) -> Row:  # type: ignore[type-arg]
        return cls(data["name"], data["detail"],
                   {t: EvalMetrics.from_dict(m) for t, m in data["merged"].items()},
                   {t: EvalMetrics.from_dict(m) for t, m in data["reference"].items()}, data.get("chosen"))

    def cells(self, mean_column: bool = True) -> list[str]:
        tasks = list(self.reference)
        value = {t: self.merged[t].primary for t in tasks}
        deltas = {t: interference_delta(value[t], self.reference[t].primary, self.reference[t].direction)
                  for t in tasks}
        normalized = min(normalized_score(value[t], self.reference[t].primary, self.reference[t].direction) or 0.0
                         for t in tasks)
        cells = [self.name, self.detail, *(f"{value[t]:.4f}" for t in tasks),
                 *(f"{deltas[t]:+.4f}" for t in tasks), f"{min(deltas.values()):+.4f}", f"{normalized:.3f}"]
        return cells + [f"{sum(value.values()) / len(tasks):.4f}"] if mean_column else cells


class RowCache:
    """Finished rows of earlier runs on the same artifacts dir, and each row's seconds."""

    def __init__(self, root: Path, profile: Profile) -> None:
        self.folder = root / "demo_results_rows"
        self.scope = [str(profile.workspace.relative_to(ROOT)),
                      profile.test_subset.model_dump(mode="json") if profile.test_subset else None]
        self.seconds = 0.0  # the rows' own compute time, read back or measured now
        self.measured_now = 0.0  # the part of it measured in this run

    def row(self, settings: dict, compute: Callable[[], Row]) -> Row:  # type: ignore[type-arg]
        key = hashlib.sha256(json.dumps([self.scope, settings], sort_keys=True).encode()).hexdigest()[:16]
        path = self.folder / f"{settings['row']}_{key}.json".replace(" ", "_")
        if path.exists():
            data = json.loads(path.read_text())
            log.info("row %r read back from %s (%.0f s when measured)", settings["row"], path, data["seconds"])
            self.seconds += data["seconds"]
            return Row.from_dict(data["row"])
        started = time.perf_counter()
        row = compute()
        seconds = time.perf_counter() - started
        self.seconds += seconds
        self.measured_now += seconds
        self.folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"settings": settings, "seconds": round(seconds, 1), "row": row.to_dict()}))
        return row


def evaluate_config(session: EvalSession, config: dict, split: str,
                    subset: EvalSubsetConfig | None) -> EvaluationResult:
    merged = run_merge(config, task_registry=session.workspace.task_registry(), artifacts_dir=session.root,
                       session=session)
    return session.evaluate_merge(merged.output, merge_tag=merged.merge_tag, tasks=config["adapters"], split=split,
                                  subset=subset, run_dir=merged.run_dir)


def best_task_vector(session: EvalSession, profile: Profile) -> float:
    """The task_vector lambda with the best mean accuracy on the train selection subset (the
    scalar rival AdaMerging has to beat; ties go to the better min-delta). Where the tasks'
    metrics differ (WER and accuracy: no mean), the best max-min objective, as sweeps rank."""
    scores = {}
    for lam in profile.lambdas:
        result = evaluate_config(session, {"adapters": list(profile.tasks), "method": "task_vector",
                                           "method_params": {"lambda": lam}}, "train", profile.selection)
        mean = sum(result.tasks[t].merged.primary for t in profile.tasks) / len(profile.tasks)
        scores[lam] = (mean, result.objective) if profile.mean_column else (result.objective, mean)
        log.info("task_vector lambda=%s train-subset mean %.4f, objective %.4f", lam, mean, result.objective)
    return max(scores, key=lambda lam: scores[lam])


def best_bayes_point(session: EvalSession, profile: Profile, budget: int) -> list[float]:
    config = parse_merge_config({
        "adapters": list(profile.tasks), "method": "weighted_delta", "split": "train",
        "eval_subset": profile.selection.model_dump(),
        "search": {"type": "bayes", "budget": budget, "init_points": min(8, budget // 2 + 1), "seed": 0,
                   "space": {"lambda": {"min": 0.0, "max": 1.5, "per_adapter": True}}},
    })
    result = run_sweep(config, session)
    return list(result.best.method_params["lambda"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", choices=sorted(PROFILES), default="demo")
    parser.add_argument("--write", action="store_true", help="write the report and the README table")
    parser.add_argument("--budget", type=int, default=None, help="bayes sweep trials (demo 20, causal 10)")
    parser.add_argument("--artifacts", type=Path, default=None, help="artifacts dir (default: temp)")
    parser.add_argument("--adamerging", action="store_true", help="add an AdaMerging row")
    parser.add_argument("--regmean", action="store_true", help="add a RegMean row")
    parser.add_argument("--regmean-plus", action="store_true", help="add a RegMean++ row")
    parser.add_argument("--regmean-weights", action="store_true",
                        help="add a RegMean row with task weights chosen by optimizer bayes on train")
    parser.add_argument("--layer-groups", action="store_true",
                        help="add the best of optimizer bayes over per-adapter lambdas in layer groups")
    parser.add_argument("--all", action="store_true", help="add every optional row")
    parser.add_argument("--add-to-table", action="store_true",
                        help="compute only the optional rows asked for and put them into the table an earlier run "
                             "wrote (bench/results), replacing a row of the same name; the others are read back")
    args = parser.parse_args()
    profile = PROFILES[args.workspace]
    budget = args.budget or profile.budget
    setup_logging(quiet_libraries=False)
    torch.manual_seed(0)
    started = time.perf_counter()
    artifacts = args.artifacts or Path(mkdtemp(prefix="demo_results_"))
    session = EvalSession.from_workspace(load_workspace(profile.workspace), artifacts, device="cpu")
    test = profile.test_subset
    cache = RowCache(artifacts, profile)
    if args.add_to_table:  # the table's rows as an earlier run wrote them, plus this run's optional rows
        rows, earlier_note = read_table(profile)
        added = optional_rows(session, profile, test, cache, args)
        for row in added:  # in place of a row of the same name, else at the end
            names = [old.name for old in rows]
            if row.name in names:
                rows[names.index(row.name)] = row
            else:
                rows.append(row)
    else:
        rows = standard_rows(session, profile, test, cache, budget) + optional_rows(session, profile, test, cache, args)
    tasks = list(profile.tasks)
    header = ["merge", "setting", *[f"{t} {_short(rows[0].reference[t].primary_metric)}" for t in tasks],
              *[f"{t} delta" for t in tasks], "min delta", "min normalised", *(["mean acc"] if profile.mean_column else [])]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row.cells(profile.mean_column)) + " |" for row in rows),
    ]
    # Rows read back from an earlier run count at the time they took then.
    minutes = (time.perf_counter() - started - cache.measured_now + cache.seconds) / 60
    note = (f"{profile.describe}; CPU, {torch.get_num_threads()} threads, {versions_line('torch')}; "
            f"{minutes:.1f} min; generated {utc_stamp('%Y-%m-%d')} by `bench/demo_results.py{command_flags(args)}`.")
    if args.add_to_table:
        note = (f"{earlier_note} Added {utc_stamp('%Y-%m-%d')} by `bench/demo_results.py{command_flags(args)}` "
                f"({minutes:.1f} min; the other rows are that earlier run's, read back from its table): "
                + ", ".join(f"'{row.name}'" for row in added) + ".")
    publish("\n".join(lines) + "\n\n" + note, profile.results if args.write else None)
    if args.write:
        replace_marked_block(ROOT / "README.md", f"<!-- {profile.marker}:start -->", f"<!-- {profile.marker}:end -->",
                             [*lines, "", note])
        if args.workspace == "demo" and not args.add_to_table:
            record_adapter_accuracies({t: rows[0].reference[t] for t in tasks})


def standard_rows(session: EvalSession, profile: Profile, test: EvalSubsetConfig | None, cache: RowCache,
                  budget: int) -> list[Row]:
    """The base model (causal), each adapter alone, and the data-free merges and the bayes sweep."""
    rows: list[Row] = []
    # Each task's own adapter on its task is the reference (cached); the "adapter alone" rows
    # evaluate each adapter on the other tasks only.
    tasks = list(profile.tasks)
    references = {t: session.reference(t, "test", test) for t in tasks}
    if profile.base_row:
        rows.append(Row("base model", "no adapter", {t: session.base_metrics(t, "test", test) for t in tasks},
                        references))
    for task in tasks:
        rows.append(cache.row({"row": f"alone_{task}"}, lambda task=task: alone_row(session, task, test, references,
                                                                                  profile)))
    rows.append(cache.row({"row": "uniform"}, lambda: Row.of(
        "uniform", "mean of deltas",
        evaluate_config(session, {"adapters": tasks, "method": "uniform"}, "test", test))))
    rows.append(cache.row({"row": "task_vector", "lambdas": profile.lambdas,
                           "selection": profile.selection.model_dump(mode="json")},
                          lambda: task_vector_row(session, profile, test)))
    rows.append(cache.row({"row": "ties"}, lambda: Row.of(
        "ties", "k=20, lambda=1", evaluate_config(session, {"adapters": tasks, "method": "ties"}, "test", test))))
    rows.append(cache.row({"row": "dare_ties"}, lambda: Row.of(
        "dare_ties", "density=0.5, seed=0",
        evaluate_config(session, {"adapters": tasks, "method": "dare_ties"}, "test", test))))
    rows.append(cache.row({"row": "bayes", "budget": budget, "selection": profile.selection.model_dump(mode="json")},
                          lambda: bayes_row(session, profile, test, budget)))
    return rows


def optional_rows(session: EvalSession, profile: Profile, test: EvalSubsetConfig | None, cache: RowCache,
                  args: argparse.Namespace) -> list[Row]:
    """The rows the flags ask for (all of the profile's with `--all`)."""
    rows: list[Row] = []
    every = set(profile.optional_rows) if args.all else set()
    if args.regmean or "regmean" in every:
        settings = {"row": "regmean", "samples": profile.regmean_samples}
        if len(profile.regmean_grid) > 1:  # chosen on train: the row depends on the grid and the subset
            settings |= {"grid": profile.regmean_grid, "selection": profile.selection.model_dump(mode="json")}
        rows.append(cache.row(settings,
                              lambda: regmean_row(session, profile, test, plus=False)))
    if profile.regmean_plus_grid and (args.regmean_plus or "regmean_plus" in every):
        settings = {"row": "regmean_plus", "samples": profile.regmean_samples, "grid": profile.regmean_plus_grid}
        if len(profile.regmean_plus_grid) > 1:
            settings |= {"selection": profile.selection.model_dump(mode="json")}
        rows.append(cache.row(settings, lambda: regmean_row(session, profile, test, plus=True)))
    if profile.regmean_weight_budget and (args.regmean_weights or "regmean_weights" in every):
        settings = {"row": "regmean_weights", "samples": profile.regmean_samples,
                    "budget": profile.regmean_weight_budget, "range": REGMEAN_WEIGHT_RANGE,
                    "selection": profile.selection.model_dump(mode="json")}
        searched = cache.row(settings, lambda: regmean_weights_row(session, profile, test))
        rows.append(searched)
        if profile.regmean_plus_grid and (args.regmean_plus or "regmean_plus" in every):
            assert searched.chosen is not None
            weights = searched.chosen["task_weights"]
            rows.append(cache.row({**settings, "row": "regmean_plus_weights", "weights": weights},
                                  lambda: regmean_plus_weights_row(session, profile, test, weights)))
    if args.adamerging or "adamerging" in every:
        rows.append(cache.row({"row": "adamerging", "params": profile.adamerging},
                              lambda: adamerging_row(session, profile, test)))
    if args.layer_groups or "layer_groups" in every:
        rows.append(cache.row({"row": "layer_groups", "groups": profile.groups, "budget": profile.group_budget,
                               "selection": profile.selection.model_dump(mode="json")},
                              lambda: layer_group_row(session, profile, test)))

    return rows


def read_table(profile: Profile) -> tuple[list[Row], str]:
    """The rows and the note of the table in the profile's results file, as an earlier run wrote
    them (accuracies to 4 decimals; each reference is the merged value minus its delta)."""
    lines = profile.results.read_text().splitlines()
    table = [line for line in lines if line.startswith("| ")]
    header = [cell.strip() for cell in table[0].strip().strip("|").split("|")]
    n = len(profile.tasks)
    if header[2].split()[-1] != "acc":
        raise SystemExit(f"--add-to-table reads accuracy tables only; {profile.results} has {header[2]!r}")
    metric = "accuracy"
    rows = []
    for line in table[1:]:
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        values = [float(cell) for cell in cells[2:2 + n]]
        deltas = [float(cell) for cell in cells[2 + n:2 + 2 * n]]
        rows.append(Row(cells[0], cells[1],
                        {t: _metric(metric, v) for t, v in zip(profile.tasks, values)},
                        {t: _metric(metric, round(v - d, 4)) for t, v, d in zip(profile.tasks, values, deltas)}))
    note = next(line for line in lines[lines.index(table[-1]) + 1:] if line.strip())
    return rows, note


def _metric(name: str, value: float) -> EvalMetrics:
    return EvalMetrics(primary_metric=name, direction="higher", metrics={name: value}, num_samples=0)


def command_flags(args: argparse.Namespace) -> str:
    """The flags that decide the table's rows, as typed (for the note under the table)."""
    flags = [] if args.workspace == "demo" else ["--workspace", args.workspace]
    if args.budget is not None:
        flags += ["--budget", str(args.budget)]
    flags += [flag for flag, on in (("--all", args.all), ("--regmean", args.regmean and not args.all),
                                    ("--regmean-plus", args.regmean_plus and not args.all),
                                    ("--regmean-weights", args.regmean_weights and not args.all),
                                    ("--adamerging", args.adamerging and not args.all),
                                    ("--layer-groups", args.layer_groups and not args.all),
                                    ("--add-to-table", args.add_to_table)) if on]
    return "".join(f" {flag}" for flag in flags)


def alone_row(session: EvalSession, task: str, test: EvalSubsetConfig | None, references: dict,  # type: ignore[type-arg]
              profile: Profile) -> Row:
    """Task `task`'s own adapter on the other tasks (its own task is the cached reference)."""
    base_row = profile.base_row
    others = [t for t in profile.tasks if t != task]
    result = session.evaluate_merge(session.task_output(task), merge_tag=f"single_{task}", tasks=others,
                                    subset=test, layout=("single", [task]))
    merged = {t: result.tasks[t].merged for t in others} | {task: references[task]}
    return Row(f"{task} adapter alone", "its own LoRA" + ("" if base_row else ", each task's head"), merged,
               references)


def task_vector_row(session: EvalSession, profile: Profile, test: EvalSubsetConfig | None) -> Row:
    lam = best_task_vector(session, profile)
    criterion = "best mean acc" if profile.mean_column else "best min delta"
    return Row.of("task_vector", f"lambda={lam:g} ({criterion} on train subset, {len(profile.lambdas)} tried)",
                  evaluate_config(session, {"adapters": list(profile.tasks), "method": "task_vector",
                                            "method_params": {"lambda": lam}}, "test", test))


def bayes_row(session: EvalSession, profile: Profile, test: EvalSubsetConfig | None, budget: int) -> Row:
    weights = best_bayes_point(session, profile, budget)
    return Row.of("bayes sweep best", "weighted_delta, lambda=[" + ", ".join(f"{w:.2f}" for w in weights)
                  + f"] ({budget} trials on train subset)",
                  evaluate_config(session, {"adapters": list(profile.tasks), "method": "weighted_delta",
                                            "method_params": {"lambda": weights}}, "test", test))


def _short(metric: str) -> str:
    """A column's metric name: `acc` for accuracy (as the text tables have it), else the metric."""
    return "acc" if metric == "accuracy" else metric.upper()


def record_adapter_accuracies(references: dict) -> None:  # type: ignore[type-arg]
    """Rewrite the accuracy table in workspaces/demo/README.md (between its markers)."""
    lines = ["| adapter | test accuracy | macro-F1 | test examples |", "|---|---|---|---|"]
    for task, metrics in references.items():
        lines.append(f"| `{task}` adapter | {metrics.metrics['accuracy']:.4f} | "
                     f"{metrics.metrics['macro_f1']:.4f} | {metrics.num_samples} |")
    replace_marked_block(ROOT / "workspaces" / "demo" / "README.md", "<!-- accuracies:start -->",
                         "<!-- accuracies:end -->", lines)


def _merge_row(session: EvalSession, config: dict, test: EvalSubsetConfig | None, name: str,
               detail: str) -> Row:
    merged = run_merge(config, task_registry=session.workspace.task_registry(), artifacts_dir=session.root,
                       session=session)
    result = session.evaluate_merge(merged.output, merge_tag=merged.merge_tag, tasks=config["adapters"], subset=test,
                                    run_dir=merged.run_dir)
    return Row.of(name, detail, result)


def adamerging_row(session: EvalSession, profile: Profile, test: EvalSubsetConfig | None) -> Row:
    """AdaMerging's learned per-layer lambdas (optimizer `adamerging`; no labels used)."""
    params = profile.adamerging
    config = {"adapters": list(profile.tasks), "method": "weighted_delta",
              "method_params": {"lambda": [1.0] * len(profile.tasks)},
              "optimizer": {"name": "adamerging", "params": params}}
    setting = ", ".join(f"{k}={v}" for k, v in params.items())
    return _merge_row(session, config, test, "adamerging",
                      f"per-layer lambdas learned by entropy minimisation ({setting})")


def regmean_row(session: EvalSession, profile: Profile, test: EvalSubsetConfig | None, *, plus: bool) -> Row:
    """RegMean (or RegMean++) on Grams of each task's unlabeled train inputs, at the (alpha, lambda)
    of the profile's grid with the best min normalised accuracy on the train selection subset."""
    grid = profile.regmean_plus_grid if plus else profile.regmean_grid
    alpha, lam = best_regmean_point(session, profile, grid, plus)
    config = {"adapters": list(profile.tasks), "method": "regmean",
              "method_params": {"alpha": alpha, "lambda": lam, "samples_per_task": profile.regmean_samples,
                                "plus": plus}}
    chosen = "" if len(grid) == 1 else (
        f" (best min normalised on train subset, alpha of {', '.join(f'{a:g}' for a, _ in grid)})"
        if len({lam for _, lam in grid}) == 1 else f" (best min normalised on train subset, {len(grid)} "
        "(alpha, lambda) tried)")
    name = "regmean++" if plus else "regmean"
    return _merge_row(session, config, test, name,
                      f"alpha={alpha:g}, lambda={lam:g}, Grams of {profile.regmean_samples} train inputs per "
                      f"task{chosen}")


def best_regmean_point(session: EvalSession, profile: Profile, grid: tuple[tuple[float, float], ...],
                       plus: bool) -> tuple[float, float]:
    if len(grid) == 1:
        return grid[0]
    scores = {}
    for alpha, lam in grid:
        result = evaluate_config(session, {"adapters": list(profile.tasks), "method": "regmean", "method_params": {
            "alpha": alpha, "lambda": lam, "samples_per_task": profile.regmean_samples, "plus": plus}},
            "train", profile.selection)
        normalised = min(result.tasks[t].normalized or 0.0 for t in profile.tasks)
        mean = sum(result.tasks[t].merged.primary for t in profile.tasks) / len(profile.tasks)
        scores[(alpha, lam)] = (normalised, mean)
        log.info("regmean%s alpha=%s lambda=%s train-subset min normalised %.4f, mean acc %.4f",
                 "++" if plus else "", alpha, lam, normalised, mean)
    return max(scores, key=lambda point: scores[point])


def regmean_weights_row(session: EvalSession, profile: Profile, test: EvalSubsetConfig | None) -> Row:
    """RegMean (alpha 0.9) with one task weight per adapter, chosen by optimizer bayes on the train
    selection subset (the sweeps' objective: the worst task's delta); the Grams are collected
    once and every trial re-solves from them."""
    low, high = REGMEAN_WEIGHT_RANGE
    budget = profile.regmean_weight_budget
    params = {"budget": budget, "init_points": min(10, budget // 2), "seed": 0, "split": "train",
              "search_subset": profile.selection.model_dump(),
              "space": {"task_weights": {"min": low, "max": high, "per_adapter": True}}}
    config = {"adapters": list(profile.tasks), "method": "regmean",
              "method_params": {"alpha": 0.9, "samples_per_task": profile.regmean_samples},
              "optimizer": {"name": "bayes", "params": params}}
    merged = run_merge(config, task_registry=session.workspace.task_registry(), artifacts_dir=session.root,
                       session=session)
    weights = merged.output.params["task_weights"]
    result = session.evaluate_merge(merged.output, merge_tag=merged.merge_tag, tasks=config["adapters"], subset=test,
                                    run_dir=merged.run_dir)
    return Row.of("regmean, task weights", "alpha=0.9, task_weights=[" + ", ".join(f"{w:.2f}" for w in weights)
                  + f"] (optimizer bayes on train subset, {budget} trials in [{low:g}, {high:g}]), Grams of "
                  f"{profile.regmean_samples} train inputs per task", result, chosen={"task_weights": weights})


def regmean_plus_weights_row(session: EvalSession, profile: Profile, test: EvalSubsetConfig | None,
                             weights: list[float]) -> Row:
    """RegMean++ at the task weights the plain RegMean search chose on train (a RegMean++ trial
    re-collects its Grams, about 5x a plain one's cost, so the search runs on plain RegMean)."""
    config = {"adapters": list(profile.tasks), "method": "regmean",
              "method_params": {"alpha": 0.9, "task_weights": weights, "samples_per_task": profile.regmean_samples,
                                "plus": True}}
    return _merge_row(session, config, test, "regmean++, task weights",
                      "alpha=0.9, the task weights of the row above (searched with plain RegMean on train)")


def layer_group_row(session: EvalSession, profile: Profile, test: EvalSubsetConfig | None) -> Row:
    """optimizer bayes over one lambda per (layer group, adapter), chosen on the train subset."""
    params = {"budget": profile.group_budget, "init_points": min(12, profile.group_budget // 2), "seed": 0,
              "split": "train", "search_subset": profile.selection.model_dump(),
              "space": {"lambda": {"min": 0.0, "max": 1.5, "per_adapter": True,
                                   "per_layer_groups": profile.groups}}}
    config = {"adapters": list(profile.tasks), "method": "weighted_delta",
              "optimizer": {"name": "bayes", "params": params}}
    return _merge_row(session, config, test, "bayes, layer groups",
                      f"weighted_delta, {profile.groups} layer groups x 3 adapters "
                      f"({profile.group_budget} trials on train subset)")


if __name__ == "__main__":
    main()
