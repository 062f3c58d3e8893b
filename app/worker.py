"""The job runner: runs planned jobs one at a time on one resident model.

`plan_job` turns a request into the plan a worker executes (the service validates with it).
`JobRunner.execute(job_id, plan)` is the single place where a job moves from running to a
final state: it runs the job through `merging_core` and, in its `finally`, records succeeded,
failed or cancelled (or queued again when the worker is shutting down). The holder restores the
model weights on every exit path (see ModelHolder).

A `JobRunner` lives in the worker process (`app/worker_process.py`), behind the `Executor`
protocol that the service talks to; an executor for several GPUs or machines (e.g. Ray actors
each holding a `JobRunner`) implements the same methods.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

from sqlalchemy.orm import sessionmaker

from app import crud
from app.db import JobKind, JobStatus
from app.errors import InvalidRequest, error_payload
from merging_core.adapters import AdapterCache
from merging_core.config import MergeConfig, parse_merge_config
from merging_core.engine.plan import MergePlan, plan_merge
from merging_core.engine.runner import execute, load_merge
from merging_core.errors import Cancelled, MergeError
from merging_core.evaluation.evaluate import EvalSession
from merging_core.evaluation.workspace import Workspace
from merging_core.runtime.cancel import CancelToken
from merging_core.search import Sweep, SweepPlan, Trial, plan_sweep

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


class JobRunner:
    """Runs planned jobs on one EvalSession (one resident model)."""

    def __init__(self, evaluator: EvalSession, db: sessionmaker) -> None:
        self.evaluator = evaluator
        self.db = db
        self.tokens: dict[str, CancelToken] = {}
        self.stopping = False  # set by shutdown(): running jobs go back to the queue

    # --- the kinds ---------------------------------------------------------------------------

    def _merge(self, job_id: str, plan: MergePlan, cancel: CancelToken,
               progress: ProgressWriter) -> dict[str, Any]:
        config = plan.config
        result = execute(plan, self.evaluator, artifacts_dir=self.evaluator.root, cancel=cancel,
                         progress=progress)
        with self.db() as db:
            crud.update_progress(db, job_id=job_id, done=0, total=1, message="merged",
                                 run_dir=str(result.run_dir))
        summary: dict[str, Any] = {
            "merge_tag": result.merge_tag,
            "run_id": result.run_dir.name,
            "run_dir": str(result.run_dir),
            "saved": result.adapter_path is not None,
            "num_modules": len(result.output.modules),
            "left_out": result.output.left_out,
        }
        if result.output.optimizer_summary:
            summary["optimizer"] = {"name": plan.optimizer.name, **result.output.optimizer_summary}
        if config.eval_tasks:
            evaluation = self.evaluator.evaluate_merge(
                result.output, merge_tag=result.merge_tag, tasks=config.eval_tasks,
                split=config.split, subset=config.eval_subset, record={"job_id": job_id},
                cancel=cancel, progress=progress, write=False,
            )
            self.evaluator.writer.write(evaluation, result.run_dir)
            summary["evaluation"] = evaluation.to_dict()
        return summary

    def _evaluate(self, job_id: str, plan: MergePlan, cancel: CancelToken,
                  progress: ProgressWriter) -> dict[str, Any]:
        config = plan.config
        output = load_merge(plan, session=self.evaluator, cancel=cancel, progress=progress)
        evaluation = self.evaluator.evaluate_merge(
            output, merge_tag=output.merge_tag, tasks=config.eval_tasks, split=config.split,
            subset=config.eval_subset, record={"job_id": job_id}, cancel=cancel, progress=progress,
            write=False,
        )
        self.evaluator.writer.write(evaluation)
        return evaluation.to_dict()

    def _sweep(self, job_id: str, plan: SweepPlan, cancel: CancelToken,
               progress: ProgressWriter) -> dict[str, Any]:
        sweep = Sweep(plan, self.evaluator)
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
                plan = plan_job(kind, parse_merge_config(request), self.evaluator.workspace,
                                self.evaluator.adapter_cache)
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
            if not self.evaluator.holder.is_pristine:  # defensive: the holder restores on exit
                log.error("job %s left weights applied; restoring", job_id)
                self.evaluator.holder.restore()
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
