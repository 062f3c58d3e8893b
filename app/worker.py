"""The job runner: runs planned jobs one at a time on one resident model.

`plan_job` turns a request into the plan a worker executes (the service validates with it).
`JobRunner.execute(job_id, plan)` is the single place where a job moves from running to a
final state: it runs the job through `merging_core` and, in its `finally`, records succeeded,
failed or cancelled (or queued again when the worker is shutting down). The holder restores the
model weights on every exit path (see ModelHolder).

A job's computing and its writing are apart: a `Compute` computes (merges, evaluations, sweep
trials) and returns picklable results; the `JobRunner` writes every one of them (run bundles,
evaluation files, the index, trial files, the database). The embedded executor
(`app/worker_process.py`) runs both in its worker process with `LocalCompute`; the Ray executor
(`app/ray_executor.py`) runs the runner in the service's process, the control plane, and
computes on model actors, so the artifacts are written by the same code either way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy.orm import sessionmaker

from app import crud
from app.db import JobKind, JobStatus
from app.errors import InvalidRequest, error_payload
from merging_core.adapters import AdapterCache
from merging_core.config import MergeConfig, parse_merge_config
from merging_core.engine.plan import MergePlan, plan_merge
from merging_core.engine.runner import StagedMerge, load_merge, publish_merge, stage_merge
from merging_core.errors import Cancelled, MergeError
from merging_core.evaluation.evaluate import EvalSession
from merging_core.evaluation.results import EvaluationResult
from merging_core.evaluation.workspace import Workspace
from merging_core.evaluation.writer import EvalWriter
from merging_core.runtime.cancel import CancelToken, Progress, check
from merging_core.search import Sweep, SweepPlan, Trial, plan_sweep
from merging_core.search.sweep import LocalTrials, TrialRunner

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 0.25

JobPlan = MergePlan | SweepPlan


def plan_job(kind: JobKind, config: MergeConfig, workspace: Workspace,
             adapter_cache: AdapterCache | None = None) -> JobPlan:
    """Everything a worker would refuse, refused now, without computing anything: the plan a
    worker executes (the service validates with it; a restarted worker re-plans with it)."""
    subset = config.eval_subset
    for task in (subset.per_task if subset is not None else {}):
        if task not in workspace.tasks:
            raise InvalidRequest(f"eval_subset.per_task: {task!r} is not a task of workspace {workspace.name!r} "
                                 f"(tasks: {', '.join(workspace.tasks)})")
    if kind is JobKind.SWEEP:
        if config.search is None:
            raise InvalidRequest("search: a sweep needs a search section (type grid or bayes)")
        return plan_sweep(config, workspace, adapter_cache=adapter_cache)
    plan = plan_merge(config, workspace.task_registry(), adapter_cache=adapter_cache,
                      task_evaluators=workspace.task_evaluators())
    for task in config.eval_tasks or []:
        workspace.task(task)  # unknown task -> ConfigError naming the known ones
    if kind is JobKind.EVALUATE and not (config.eval_tasks or any(a in workspace.tasks
                                                                 for a in config.adapters)):
        raise InvalidRequest("eval_tasks: nothing to evaluate; name the tasks to evaluate on")
    return plan


class Executor(Protocol):
    def start(self) -> None: ...

    def submit(self, job_id: str, plan: JobPlan | None = None) -> None: ...

    def cancel(self, job_id: str) -> None: ...

    def stop(self) -> None: ...


class ProgressWriter:
    """A job's progress callback: writes the database at most every PROGRESS_INTERVAL_S, except
    for the last step and for a new best point. Built once per job."""

    def __init__(self, db: sessionmaker, job_id: str) -> None:
        self.db, self.job_id = db, job_id
        self.last = float("-inf")

    def __call__(self, done: int, total: int, message: str, extra: dict[str, Any]) -> None:
        now = time.monotonic()
        if now - self.last < PROGRESS_INTERVAL_S and done < total and "best" not in extra:
            return
        self.last = now
        with self.db() as db:
            crud.update_progress(db, job_id=self.job_id, done=done, total=total, message=message,
                                 best=extra.get("best"))


@dataclass
class ComputedMerge:
    """A merge job's computed part, nothing of it in the artifact layout yet: the staged run
    bundle (the saved adapter in a hidden temp dir), the evaluation, and what the job's result
    reports. Picklable: a Ray actor returns it to the control plane, which publishes it."""

    staged: StagedMerge
    num_modules: int
    left_out: dict[str, list[str]]
    optimizer: str
    optimizer_summary: dict[str, Any] | None
    evaluation: EvaluationResult | None


def compute_merge(session: EvalSession, job_id: str, plan: MergePlan, cancel: CancelToken,
                  progress: Progress | None) -> ComputedMerge:
    """Merge, save into the staged bundle, evaluate: everything of a merge job but writing."""
    started = time.perf_counter()
    config = plan.config
    output = load_merge(plan, session=session, cancel=cancel, progress=progress)
    staged = stage_merge(plan, output, session.root, started=started, progress=progress)
    try:
        evaluation = None
        if config.eval_tasks:
            evaluation = session.evaluate_merge(
                output, merge_tag=output.merge_tag, tasks=config.eval_tasks, split=config.split,
                subset=config.eval_subset, record={"job_id": job_id}, cancel=cancel,
                progress=progress, write=False,
            )
    except BaseException:
        staged.discard()
        raise
    return ComputedMerge(staged=staged, num_modules=len(output.modules), left_out=dict(output.left_out),
                         optimizer=plan.optimizer.name, optimizer_summary=output.optimizer_summary or None,
                         evaluation=evaluation)


def compute_evaluation(session: EvalSession, job_id: str, plan: MergePlan, cancel: CancelToken,
                       progress: Progress | None) -> EvaluationResult:
    """Load a merge (a saved adapter or a planned merge) and evaluate it; writes nothing."""
    config = plan.config
    output = load_merge(plan, session=session, cancel=cancel, progress=progress)
    return session.evaluate_merge(
        output, merge_tag=output.merge_tag, tasks=config.eval_tasks, split=config.split,
        subset=config.eval_subset, record={"job_id": job_id}, cancel=cancel, progress=progress,
        write=False,
    )


class Compute(Protocol):
    """Where a job's computing happens: this process's resident model (`LocalCompute`), or
    model actors (`app.ray_executor.RayCompute`). The job runner writes every result."""

    workspace: Workspace
    adapter_cache: AdapterCache

    def merge(self, job_id: str, plan: MergePlan, cancel: CancelToken,
              progress: Progress) -> ComputedMerge: ...

    def evaluate(self, job_id: str, plan: MergePlan, cancel: CancelToken,
                 progress: Progress) -> EvaluationResult: ...

    def trials(self, job_id: str) -> AbstractContextManager[TrialRunner]: ...


class LocalCompute:
    """Jobs computed on one `EvalSession` (one resident model) in this process."""

    def __init__(self, session: EvalSession) -> None:
        self.session = session
        self.workspace = session.workspace
        self.adapter_cache = session.adapter_cache

    def merge(self, job_id: str, plan: MergePlan, cancel: CancelToken, progress: Progress) -> ComputedMerge:
        with self._restored(job_id):
            return compute_merge(self.session, job_id, plan, cancel, progress)

    def evaluate(self, job_id: str, plan: MergePlan, cancel: CancelToken,
                 progress: Progress) -> EvaluationResult:
        with self._restored(job_id):
            return compute_evaluation(self.session, job_id, plan, cancel, progress)

    @contextmanager
    def trials(self, job_id: str) -> Iterator[TrialRunner]:
        with self._restored(job_id):
            yield LocalTrials(self.session)

    @contextmanager
    def _restored(self, job_id: str) -> Iterator[None]:
        try:
            yield
        finally:
            restore_if_needed(self.session, job_id)


def restore_if_needed(session: EvalSession, job_id: str) -> None:
    """Defensive: the holder restores the weights on every exit path of a job's work."""
    if not session.holder.is_pristine:
        log.error("job %s left weights applied; restoring", job_id)
        session.holder.restore()


class JobRunner:
    """Runs planned jobs: `compute` computes them (here, or on model actors); the runner
    writes every result (run bundles, evaluation files, the index, trial files, the database)
    under `root`, with `writer`."""

    def __init__(self, compute: Compute, db: sessionmaker, root: Path, writer: EvalWriter) -> None:
        self.compute = compute
        self.db = db
        self.root = root
        self.writer = writer
        self.tokens: dict[str, CancelToken] = {}
        self.stopping = False  # set by shutdown(): running jobs go back to the queue

    # --- the kinds ---------------------------------------------------------------------------

    def _merge(self, job_id: str, plan: MergePlan, cancel: CancelToken,
               progress: ProgressWriter) -> dict[str, Any]:
        computed = self.compute.merge(job_id, plan, cancel, progress)
        try:
            check(cancel)
            run_dir, _ = publish_merge(computed.staged)
        except BaseException:
            computed.staged.discard()
            raise
        with self.db() as db:
            crud.update_progress(db, job_id=job_id, done=0, total=1, message="merged",
                                 run_dir=str(run_dir))
        summary: dict[str, Any] = {
            "merge_tag": computed.staged.merge_tag,
            "run_id": run_dir.name,
            "run_dir": str(run_dir),
            "saved": computed.staged.saved is not None,
            "num_modules": computed.num_modules,
            "left_out": computed.left_out,
        }
        if computed.optimizer_summary:
            summary["optimizer"] = {"name": computed.optimizer, **computed.optimizer_summary}
        if computed.evaluation is not None:
            self.writer.write(computed.evaluation, run_dir)
            summary["evaluation"] = computed.evaluation.to_dict()
        return summary

    def _evaluate(self, job_id: str, plan: MergePlan, cancel: CancelToken,
                  progress: ProgressWriter) -> dict[str, Any]:
        evaluation = self.compute.evaluate(job_id, plan, cancel, progress)
        self.writer.write(evaluation)
        return evaluation.to_dict()

    def _sweep(self, job_id: str, plan: SweepPlan, cancel: CancelToken,
               progress: ProgressWriter) -> dict[str, Any]:
        with self.compute.trials(job_id) as trials:
            sweep = Sweep(plan, root=self.root, writer=self.writer, runner=trials)
            with self.db() as db:
                crud.update_progress(db, job_id=job_id, done=0, total=sweep.total, message="starting",
                                     sweep_id=sweep.sweep_id)

            def on_trial(trial: Trial) -> None:
                with self.db() as db:
                    crud.record_trial(db, job_id=job_id, sweep_id=sweep.sweep_id, trial=trial.to_dict())

            result = sweep.run(cancel=cancel, progress=progress, on_trial=on_trial)
        best = result.best
        return {
            "sweep_id": result.sweep_id,
            "summary": str(result.summary_path),
            "plot": str(result.plot_path) if result.plot_path else None,
            "num_trials": len(result.trials),
            "resumed_trials": result.resumed_trials,
            "warm_start": result.warm_start,
            "best": best.to_dict(),
        }

    # --- the one place where a running job ends ----------------------------------------------

    def execute(self, job_id: str, plan: JobPlan | None = None) -> None:
        """Run a queued job. `plan` is the one the service validated with; without it (after a
        restart) the job is re-planned from its stored request."""
        with self.db() as db:
            job = crud.get_job(db, job_id=job_id)
            if job.status != JobStatus.QUEUED.value or self.stopping:
                return  # cancelled while queued, already handled, or the worker is stopping
            job = crud.transition(db, job_id=job_id, status=JobStatus.RUNNING,
                                  progress_message="running")
            kind, request = JobKind(job.kind), dict(job.request)
        cancel = self.tokens.setdefault(job_id, CancelToken())
        if job.cancel_requested or self.stopping:
            cancel.cancel()
        final, fields = JobStatus.FAILED, {}
        try:
            if plan is None:
                plan = plan_job(kind, parse_merge_config(request), self.compute.workspace,
                                self.compute.adapter_cache)
            handler = {JobKind.MERGE: self._merge, JobKind.EVALUATE: self._evaluate,
                       JobKind.SWEEP: self._sweep}[kind]
            result = handler(job_id, plan, cancel, ProgressWriter(self.db, job_id))
            final, fields = JobStatus.SUCCEEDED, {"result": result, "progress_message": "done"}
        except Cancelled:
            if self.stopping and not self._cancel_requested(job_id):
                final, fields = JobStatus.QUEUED, {
                    "progress_message": "re-queued: the service stopped; the next start resumes it"}
            else:
                final, fields = JobStatus.CANCELLED, {"progress_message": "cancelled; weights restored"}
        except MergeError as exc:  # bad input found while running: the message says it all
            log.warning("job %s failed: %s: %s", job_id, type(exc).__name__, exc)
            final, fields = JobStatus.FAILED, {"error": error_payload(exc), "progress_message": "failed"}
        except Exception as exc:  # noqa: BLE001 - every failure becomes the job's structured error
            log.exception("job %s failed", job_id)
            final, fields = JobStatus.FAILED, {"error": error_payload(exc), "progress_message": "failed"}
        finally:
            self.tokens.pop(job_id, None)
            with self.db() as db:
                crud.transition(db, job_id=job_id, status=final, **fields)

    def _cancel_requested(self, job_id: str) -> bool:
        with self.db() as db:
            return bool(crud.get_job(db, job_id=job_id).cancel_requested)

    def shutdown(self) -> None:
        """Stop at the next batch or trial: running jobs are re-queued, weights restored."""
        self.stopping = True
        for token in list(self.tokens.values()):
            token.cancel()

    def cancel(self, job_id: str) -> None:
        token = self.tokens.get(job_id)
        if token is not None:
            token.cancel()
        else:
            self.tokens[job_id] = CancelToken()
            self.tokens[job_id].cancel()
