"""Sweeps over merge coefficients: plan once, then evaluate the proposer's points, ranked max-min.

`plan_sweep(config, workspace)` validates a sweep without evaluating anything: the merge is
planned once (at the first point, adapters loaded and checked), and every other point of the
space (each grid point, or both corners of a Bayesian space) is checked as a variant of that
plan: its parameters and lambda policy only, no adapter loaded again and no merge built. A
`SweepPlan` is frozen and picklable.

`Sweep(plan, session).run()` asks its proposer (`search.proposers`) for points, merges each in
memory on the resident model, evaluates every task, restores, and writes the trial at once
(`sweeps/<sweep_id>/trials/trial_NNNN.json`). A `TrialRunner` computes the trials: one at a
time on the session's model (`LocalTrials`), or several at once on model actors (the service's
Ray executor); the sweep's own process always writes every record. The sweep id hashes everything that defines the
sweep, so starting the same sweep again with the same artifacts directory resumes it: finished
trials are read back and observed, never re-run, and the proposals are the same.

Layer groups (`per_layer_groups: K` in a Bayesian space, `lambda@groupG` keys in a grid) split
the L layers the merge's modules span into K contiguous blocks, resolved once the merge is
planned (`SweepPlan.layer_groups`); each group's value becomes the `per_layer` lambda override
of every layer in it, so a trial's merge records the resolved per-layer overrides.

Multi-fidelity sweeps (`search.multi_fidelity`) score each trial on the eval subset's size for
its rung (`SweepPlan.subset_at`: a prefix of the subset's fixed order, so the sizes are
nested) and record it as the trial's `fidelity`; only trials at the top fidelity, the eval
subset itself, rank the sweep (its best, the summary's ranking, the plot).

Objective: the min over tasks of the interference delta (higher is better). The summary
`sweeps/<sweep_id>.json` keeps every task's metric for each trial, ranked, with the best point
(and the layers of each layer group, when there are any); `sweeps/<sweep_id>.png` plots the
space.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from merging_core.adapters import AdapterCache
from merging_core.config.loader import parse_merge_config
from merging_core.config.schema import EvalSubsetConfig, MergeConfig, SearchConfig
from merging_core.engine.plan import MergePlan, plan_merge, plan_variant
from merging_core.engine.registry import get_method
from merging_core.engine.runner import load_merge
from merging_core.errors import ConfigError, ParamError
from merging_core.evaluation.evaluate import EvalSession
from merging_core.evaluation.results import EvaluationResult
from merging_core.evaluation.subsets import FidelitySubsetConfig, subset_namespace
from merging_core.evaluation.workspace import Workspace
from merging_core.evaluation.writer import EvalWriter
from merging_core.runtime.cancel import CancelToken, Progress, check, report
from merging_core.runtime.io import atomic_write_json
from merging_core.runtime.paths import sweep_plot_file, sweep_summary_file, trial_file
from merging_core.search.proposers import Proposal, make_proposer
from merging_core.search.space import (
    Dimension,
    LayerGroups,
    build_dimensions,
    coordinate_labels,
    grid_point_to_merge,
    grid_points,
    layer_group_count,
    point_to_merge,
    resolve_layer_groups,
)
from merging_core.search.trials import SweepResult, Trial, ranked_trials
from merging_core.search.warm_start import load_warm_start

log = logging.getLogger(__name__)
# The in-progress summary is rewritten at most this often (every trial is on disk at once in
# its own file; rewriting the ranked list after each one made long sweeps quadratic).
SUMMARY_INTERVAL_S = 5.0


@dataclass(frozen=True)
class SweepPlan:
    """A validated sweep: the request, the merge planned at its first point, the evaluated
    tasks, the search dimensions, the sweep's id and context (for resume and warm start), and
    the layers of each layer group (empty when the search names none)."""

    config: MergeConfig
    base: MergePlan
    tasks: tuple[str, ...]
    dimensions: tuple[Dimension, ...]
    sweep_id: str
    context: dict[str, Any]
    layer_groups: LayerGroups = ()

    @property
    def search(self) -> SearchConfig:
        assert self.config.search is not None
        return self.config.search

    @property
    def total(self) -> int:
        return len(grid_points(self.search)) if self.search.type == "grid" else self.search.budget

    @property
    def fidelity(self) -> int | None:
        """What the sweep is ranked at: the eval subset's size (None: the full split). Every
        trial of a plain sweep is scored at it; in a multi-fidelity sweep it is the top one."""
        subset = self.config.eval_subset
        return subset.max_samples if subset is not None and subset.enabled else None

    @property
    def fidelities(self) -> list[int | None]:
        """Every fidelity a trial may be scored at, smallest first."""
        multi = self.search.multi_fidelity
        return list(multi.fidelities) if multi is not None else [self.fidelity]

    @property
    def top_fidelity(self) -> int | None:
        """The fidelity that ranks a multi-fidelity sweep (None: not one; every trial ranks)."""
        return self.fidelity if self.search.multi_fidelity is not None else None

    def subset_at(self, fidelity: int | None) -> EvalSubsetConfig | None:
        """The eval subset of a trial scored at `fidelity`: the sweep's own at the top (same
        rows, caches and results directory as a plain sweep), else the first `fidelity` rows
        of its fixed order."""
        subset = self.config.eval_subset
        if fidelity is None or subset is None or fidelity == self.fidelity:
            return subset
        return FidelitySubsetConfig(**subset.model_dump(), fidelity=fidelity)

    def trial_plan(self, point: dict[str, Any]) -> MergePlan:
        """The merge at `point`: a variant of the base plan (no adapter is loaded again)."""
        return plan_variant(self.base, *_merge_settings(self.config, self.dimensions, point,
                                                         self.layer_groups))

    def labels(self) -> dict[str, str]:
        """Readable coordinate names (a layer group shows its layers and adapter)."""
        names = [d.name for d in self.dimensions] or list(self.search.grid)
        return coordinate_labels(names, self.layer_groups, self.config.adapters)


def _merge_settings(config: MergeConfig, dimensions: Sequence[Dimension], point: dict[str, Any],
                    groups: LayerGroups | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(method_params, lambda_policy) of the merge at `point` (`groups` None: layer groups not
    resolved yet, their coordinates left out)."""
    assert config.search is not None
    if config.search.type == "grid":
        return grid_point_to_merge(point, config, groups)
    return point_to_merge(point, dimensions, config, groups)


def _context(config: MergeConfig, tasks: Sequence[str]) -> dict[str, Any]:
    return {
        "method": config.method,
        "adapters": list(config.adapters),
        "merge_mode": config.merge_mode,
        "split": config.split,
        "eval_tasks": list(tasks),
        "constraint_nonnegative": config.constraint_nonnegative,
        "eval_subset": subset_namespace(config.eval_subset),
    }


def _sweep_id(config: MergeConfig, context: dict[str, Any]) -> str:
    assert config.search is not None
    search = config.search.model_dump(
        mode="json", exclude={"warm_start_sweeps", "warm_start_max_points"}
    )
    for space in search["space"].values():  # left out unset: earlier sweeps keep their ids (and resume)
        if space["per_layer_groups"] is None:
            del space["per_layer_groups"]
    if search["multi_fidelity"] is None:
        del search["multi_fidelity"]
    defining = {
        "context": context,
        "search": search,
        "method_params": config.method_params,
        "lambda_policy": config.lambda_policy.model_dump(mode="json"),
        "transforms": [t.model_dump(mode="json") for t in config.transforms],
    }
    digest = hashlib.sha1(json.dumps(defining, sort_keys=True, default=str).encode()).hexdigest()
    return f"sweep_{digest[:12]}"


def _checked_points(search: SearchConfig, dimensions: Sequence[Dimension]) -> list[dict[str, Any]]:
    """The points that validate a space: every grid point (values may only be valid together,
    e.g. DELLA's density and epsilon), or both corners of a Bayesian space. Each is checked as
    a variant of the base plan: parameters and policy only, microseconds a point."""
    if search.type == "bayes":
        return [{d.name: d.from_unit(u) for d in dimensions} for u in (0.0, 1.0)]
    return grid_points(search)


def _check_multi_fidelity(config: MergeConfig) -> None:
    """The eval subset a multi-fidelity search needs: its seed, shuffle and stratification
    define the nested subsets, and its size is the top fidelity."""
    assert config.search is not None and config.search.multi_fidelity is not None
    fidelities = config.search.multi_fidelity.fidelities
    subset = config.eval_subset
    if subset is None or not subset.enabled or subset.max_samples is None:
        raise ConfigError(
            "search.multi_fidelity needs an eval_subset with max_samples: its seed, shuffle and "
            f"stratified define the nested subsets, and max_samples is the top fidelity "
            f"(here eval_subset: {{max_samples: {fidelities[-1]}}})"
        )
    if subset.max_samples != fidelities[-1]:
        raise ConfigError(
            f"search.multi_fidelity.fidelities ends at {fidelities[-1]}, but eval_subset.max_samples "
            f"is {subset.max_samples}; the top fidelity is the eval subset itself, so they must be equal"
        )
    overridden = sorted(task for task, override in subset.per_task.items()
                        if override.max_samples is not None)
    if overridden:
        raise ConfigError(
            f"search.multi_fidelity: eval_subset.per_task sets max_samples for "
            f"{', '.join(overridden)}; the fidelities are subset sizes shared by every task"
        )


def plan_sweep(
    config: MergeConfig | dict[str, Any],
    workspace: Workspace,
    *,
    adapter_cache: AdapterCache | None = None,
) -> SweepPlan:
    """Validate a sweep against a workspace and resolve it into a `SweepPlan`; runs nothing."""
    if isinstance(config, dict):
        config = parse_merge_config(config)
    if config.search is None:
        raise ConfigError("a sweep needs a `search` section (search.type: grid or bayes)")
    if config.optimizer.name != "none":
        raise ConfigError(
            f"optimizer: a sweep searches the coefficients itself; use optimizer none, not "
            f"{config.optimizer.name!r} (or run the optimizer as a merge)"
        )
    if config.search.multi_fidelity is not None:
        _check_multi_fidelity(config)
    tasks = list(config.eval_tasks or [a for a in config.adapters if a in workspace.tasks])
    if not tasks:
        raise ConfigError("a sweep needs eval_tasks, or adapters that are workspace tasks")
    for task in tasks:
        workspace.task(task)  # unknown task -> ConfigError naming the known ones
    method = get_method(config.method)
    search = config.search
    dimensions = (build_dimensions(search, len(config.adapters), config.constraint_nonnegative)
                  if search.type == "bayes" else [])
    for dimension in dimensions:
        if dimension.param not in method.param_index:
            raise ParamError(
                f"search.space.{dimension.param}: method {method.name!r} has no such "
                f"parameter; it has: {', '.join(method.param_index) or 'none'}"
            )
    has_groups = layer_group_count(search) is not None  # also checks a grid's keys
    points = _checked_points(search, dimensions)
    # Layer groups split the layers the merge's modules span, known once it is planned: the
    # first point is planned without its group coordinates, then re-planned with them.
    params, policy = _merge_settings(config, dimensions, points[0], None if has_groups else ())
    first = parse_merge_config({**config.model_dump(exclude_unset=True), "method_params": params,
                                "lambda_policy": policy})
    base = plan_merge(first, workspace.task_registry(), adapter_cache=adapter_cache,
                      task_evaluators=workspace.task_evaluators())
    context = _context(config, tasks)
    plan = SweepPlan(config=config, base=base, tasks=tuple(tasks), dimensions=tuple(dimensions),
                     sweep_id=_sweep_id(config, context), context=context,
                     layer_groups=resolve_layer_groups(search, base.modules))
    if has_groups:
        plan = replace(plan, base=plan.trial_plan(points[0]))
    for point in points[1:]:
        plan.trial_plan(point)
    return plan


@dataclass(frozen=True)
class TrialRequest:
    """What a worker needs to score one trial: the merge at its point (a planned variant) and
    where to evaluate it. Picklable: a Ray actor computes it, the sweep's process records it."""

    index: int
    plan: MergePlan
    tasks: tuple[str, ...]
    split: str
    subset: EvalSubsetConfig | None
    eval_id: str
    record: dict[str, Any]


@dataclass
class TrialOutcome:
    """A scored trial as a worker returns it (nothing of it written yet); `worker` names who
    computed it (None: this process)."""

    result: EvaluationResult
    params: dict[str, Any]
    merge_tag: str
    duration_s: float
    worker: str | None = None


def compute_trial(session: EvalSession, request: TrialRequest,
                  cancel: CancelToken | None = None) -> TrialOutcome:
    """Merge at the trial's point on the session's resident model and evaluate every task;
    writes nothing but the reference/base caches."""
    started = time.perf_counter()
    output = load_merge(request.plan, session=session)
    result = session.evaluate_merge(
        output, merge_tag=output.merge_tag, tasks=request.tasks, split=request.split,
        subset=request.subset, entry_id=request.eval_id, record=request.record, cancel=cancel,
        write=False,
    )
    return TrialOutcome(result=result, params=output.params, merge_tag=output.merge_tag,
                        duration_s=round(time.perf_counter() - started, 4))


class TrialRunner(Protocol):
    """Where a sweep's trials are computed: this process (`LocalTrials`), or a pool of model
    actors. The sweep proposes, submits and records; the runner only computes."""

    def capacity(self, in_flight: int, cancel: CancelToken | None) -> int:
        """How many more trials may start now (with `in_flight` running). With none in flight
        it waits for room for at least one."""
        ...

    def submit(self, request: TrialRequest) -> None: ...

    def wait(self, cancel: CancelToken | None) -> tuple[TrialRequest, TrialOutcome]:
        """The next finished trial (raises `Cancelled` once `cancel` is set, with every
        running trial stopped)."""
        ...


class LocalTrials:
    """One trial at a time on the session's resident model, computed when waited for."""

    def __init__(self, session: EvalSession) -> None:
        self.session = session
        self.queue: list[TrialRequest] = []

    def capacity(self, in_flight: int, cancel: CancelToken | None) -> int:
        return 0 if in_flight else 1

    def submit(self, request: TrialRequest) -> None:
        self.queue.append(request)

    def wait(self, cancel: CancelToken | None) -> tuple[TrialRequest, TrialOutcome]:
        request = self.queue.pop(0)
        return request, compute_trial(self.session, request, cancel)


class Sweep:
    """One planned sweep; `run()` resumes from persisted trials.

    The sweep's process proposes points, records every trial (its evaluation files, index
    entry and trial file) and writes the summary and plot; `runner` computes the trials, one at
    a time on `session`'s resident model by default, or several at once on model actors. With
    a runner, `root` and `writer` say where the records go (the session's by default)."""

    def __init__(self, plan: SweepPlan, session: EvalSession | None = None, *,
                 root: Path | None = None, writer: EvalWriter | None = None,
                 runner: TrialRunner | None = None) -> None:
        if session is None and (root is None or writer is None or runner is None):
            raise TypeError("Sweep needs a session, or a root, a writer and a runner")
        self.plan = plan
        self.root = Path(root) if root is not None else session.root  # type: ignore[union-attr]
        self.writer = writer if writer is not None else session.writer  # type: ignore[union-attr]
        self.runner: TrialRunner = runner if runner is not None else LocalTrials(session)  # type: ignore[arg-type]
        self.sweep_id = plan.sweep_id
        self.total = plan.total
        config = plan.config
        self.summary_path = sweep_summary_file(self.root, config.method, config.adapters, plan.sweep_id)
        self.plot_path = sweep_plot_file(self.root, config.method, config.adapters, plan.sweep_id)

    def _trial_path(self, index: int) -> Path:
        config = self.plan.config
        return trial_file(self.root, config.method, config.adapters, self.sweep_id, index)

    def _load_trials(self) -> dict[int, Trial]:
        """Every trial on disk (a parallel sweep may have finished some past a gap)."""
        found = {}
        for index in range(self.total):
            path = self._trial_path(index)
            if path.is_file():
                found[index] = Trial.from_dict(json.loads(path.read_text()))
        return found

    def _record(self, trial: Trial) -> Trial:
        atomic_write_json(self._trial_path(trial.index), trial.to_dict())
        return trial

    def _request(self, proposal: Proposal) -> TrialRequest:
        fidelity = proposal.fidelity if proposal.fidelity is not None else self.plan.fidelity
        return TrialRequest(
            index=proposal.index, plan=self.plan.trial_plan(proposal.point), tasks=self.plan.tasks,
            split=self.plan.config.split, subset=self.plan.subset_at(fidelity),
            eval_id=f"{self.sweep_id}/trial_{proposal.index:04d}",
            record={"sweep_id": self.sweep_id, "trial": proposal.index},
        )

    def _finish(self, proposal: Proposal, request: TrialRequest, outcome: TrialOutcome) -> Trial:
        """Record a computed trial: its evaluation (files, index entry), then its trial file."""
        self.writer.write(outcome.result)
        result = outcome.result
        fidelity = proposal.fidelity if proposal.fidelity is not None else self.plan.fidelity
        return self._record(Trial(
            index=proposal.index, point=proposal.point, source=proposal.source,
            objective=result.objective, metrics=result.metrics, interference_delta=result.deltas,
            method_params=outcome.params, lambda_policy=result.lambda_policy,
            merge_tag=outcome.merge_tag, eval_id=request.eval_id, duration_s=outcome.duration_s,
            fidelity=fidelity, worker=outcome.worker, promoted_from=proposal.promoted_from,
        ))

    def _reused(self, proposal: Proposal) -> Trial:
        """A warm-start trial at this very point (the sweep's subset), recorded as this one."""
        assert proposal.reuse is not None
        return self._record(Trial.from_dict({"fidelity": self.plan.fidelity, **proposal.reuse,
                                             "index": proposal.index, "source": "warm_start"}))

    def run(
        self,
        *,
        cancel: CancelToken | None = None,
        progress: Progress | None = None,
        on_trial: Callable[[Trial], None] | None = None,
    ) -> SweepResult:
        """Run or resume; `on_trial` sees every trial once it is on disk (resumed ones too).

        Trials are proposed in index order, as many at a time as the runner has room for (the
        others in flight are the proposer's pending points). A finished trial is recorded at
        once and observed as it finishes (grid, bayes) or in index order (successive halving);
        it is reported (progress, `on_trial`) in index order. A resumed sweep
        reads every trial file back; an index with none is proposed again."""
        search = self.plan.search
        warm, skipped = ([], [])
        if search.warm_start_sweeps:
            warm, skipped = load_warm_start(search, self.plan.context, self.plan.dimensions,
                                            self.summary_path, layer_groups=self.plan.layer_groups,
                                            fidelities=self.plan.fidelities)
        proposer = make_proposer(search, self.plan.dimensions, warm)
        on_disk = self._load_trials()
        trials: list[Trial] = []  # observed, in index order
        pending: list[Proposal] = []  # proposed, not observed yet, in index order
        finished: dict[int, Trial] = {}  # recorded, waiting for an earlier trial
        observed: set[int] = set()  # fed to the proposer
        running: dict[int, Proposal] = {}
        computed: set[int] = set()  # computed by this run (not resumed, not reused)
        next_index = resumed = 0
        best: Trial | None = None
        summary_written = float("-inf")
        while len(trials) < self.total:
            check(cancel)
            moved = False
            if proposer.observes_out_of_order:  # every finished trial, as it finishes
                for index in sorted(set(finished) - observed):
                    pending.remove(next(p for p in pending if p.index == index))
                    proposer.observe([finished[index]])
                    observed.add(index)
            while len(trials) in finished:  # report (and else observe) in index order
                trial = finished.pop(len(trials))
                if trial.index not in observed:
                    assert pending[0].index == trial.index
                    pending.pop(0)
                    proposer.observe([trial])
                    observed.add(trial.index)
                trials.append(trial)
                moved = True
                if on_trial is not None:
                    on_trial(trial)
                message = f"trial {trial.index} objective {trial.objective:.4f}"
                ranks = self.plan.top_fidelity is None or trial.fidelity == self.plan.top_fidelity
                if self.plan.top_fidelity is not None:
                    message += f" (fidelity {trial.fidelity})"
                if ranks and (best is None or trial.objective > best.objective):  # a new best: always reported
                    best = trial
                    report(progress, len(trials), self.total, message,
                           best={"index": best.index, "objective": best.objective, "point": best.point})
                else:
                    report(progress, len(trials), self.total, message)
                if trial.index in computed and time.monotonic() - summary_written >= SUMMARY_INTERVAL_S:
                    self._write_summary(trials, warm, skipped, complete=False)
                    summary_written = time.monotonic()
            if len(trials) >= self.total:
                break
            room = self.runner.capacity(len(running), cancel) if next_index < self.total else 0
            while next_index < self.total:
                if next_index in on_disk:  # resumed: observed before anything after it is proposed
                    trial = on_disk.pop(next_index)
                    pending.append(Proposal(trial.index, trial.point, trial.source, fidelity=trial.fidelity,
                                            promoted_from=trial.promoted_from))
                    finished[trial.index] = trial
                    next_index += 1
                    resumed += 1
                    moved = True
                    break
                gap = next((i for i in range(next_index, self.total) if i in on_disk), self.total)
                wanted = min(room, gap - next_index)
                proposals = proposer.propose(wanted, pending) if wanted > 0 else []
                if not proposals:
                    break
                for proposal in proposals:
                    assert proposal.index == next_index, "proposals come in index order"
                    pending.append(proposal)
                    next_index += 1
                    if proposal.reuse is not None:
                        finished[proposal.index] = self._reused(proposal)
                    else:
                        self.runner.submit(self._request(proposal))
                        running[proposal.index] = proposal
                        room -= 1
                moved = True
            if not running:
                if moved:
                    continue
                raise RuntimeError(f"sweep {self.sweep_id}: nothing to run at trial {len(trials)}")
            request, outcome = self.runner.wait(cancel)
            proposal = running.pop(request.index)
            finished[request.index] = self._finish(proposal, request, outcome)
            computed.add(request.index)
        result = SweepResult(
            sweep_id=self.sweep_id, summary_path=self.summary_path, plot_path=None, trials=trials,
            warm_start={"used": self._warm_used(trials, warm), "skipped": skipped}, resumed_trials=resumed,
            top_fidelity=self.plan.top_fidelity,
        )
        self._write_summary(trials, warm, skipped, complete=True)
        result.plot_path = self._plot(trials)
        return result

    def _warm_used(self, trials: list[Trial], warm: list[dict[str, Any]]) -> int:
        """Warm-start points that counted: a grid reuses those on its grid; bayes observes all."""
        if self.plan.search.type == "grid":
            return sum(trial.source == "warm_start" for trial in trials)
        return len(warm)

    def _write_summary(self, trials: list[Trial], warm: list[dict[str, Any]],
                       skipped: list[dict[str, str]], *, complete: bool) -> None:
        ranked = ranked_trials(trials, self.plan.top_fidelity)
        search = self.plan.search
        layer_groups = ({"layer_groups": [list(group) for group in self.plan.layer_groups]}
                        if self.plan.layer_groups else {})
        multi_fidelity = {}
        if search.multi_fidelity is not None:
            # The ranked (top-fidelity) trials first, then each lower fidelity's, ranked.
            screened = sorted((t for t in trials if t.fidelity != self.plan.top_fidelity),
                              key=lambda t: (-(t.fidelity or 0), -t.objective, t.index))
            multi_fidelity = {"multi_fidelity": {
                "fidelities": search.multi_fidelity.fidelities, "eta": search.multi_fidelity.eta,
                "ranked_at": self.plan.top_fidelity,
                "trials_per_fidelity": {str(f): sum(t.fidelity == f for t in trials)
                                        for f in search.multi_fidelity.fidelities},
            }}
            listed = ranked + screened
        else:
            listed = ranked
        atomic_write_json(self.summary_path, {
            "sweep_id": self.sweep_id,
            "context": self.plan.context,
            "search": search.model_dump(mode="json"),
            "dimensions": [d.name for d in self.plan.dimensions] or list(search.grid),
            **layer_groups,
            **multi_fidelity,
            "objective": "min over tasks of interference_delta (higher is better)",
            "complete": complete,
            "num_trials": len(trials),
            "best": ranked[0].to_dict() if ranked else None,
            "trials": [t.to_dict() for t in listed],
            "warm_start": {"used": self._warm_used(trials, warm), "skipped": skipped},
            "plot": self.plot_path.name,
        })

    def _plot(self, trials: list[Trial]) -> Path | None:
        from merging_core.search.plot import plot_sweep

        ranked = ranked_trials(trials, self.plan.top_fidelity)  # lower fidelities only screen
        try:
            plot_sweep(ranked, self.plan.tasks, self.plot_path, labels=self.plan.labels())
        except ValueError as exc:  # e.g. non-numeric grid values: nothing to draw
            log.warning("no sweep plot: %s", exc)
            return None
        return self.plot_path


def run_sweep(
    config: MergeConfig,
    session: EvalSession,
    *,
    cancel: CancelToken | None = None,
    progress: Progress | None = None,
    on_trial: Callable[[Trial], None] | None = None,
) -> SweepResult:
    """Plan and run (or resume) the sweep that `config.search` describes."""
    plan = plan_sweep(config, session.workspace, adapter_cache=session.adapter_cache)
    return Sweep(plan, session).run(cancel=cancel, progress=progress, on_trial=on_trial)
