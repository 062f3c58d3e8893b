"""The Ray executor (`LORA_MERGE_EXECUTOR=ray`): model actors compute, this process writes.

The service's process is the control plane. It owns the database, job states, run bundles,
evaluation files, `eval/index.json` and its mirror, trial files and sweep summaries: it runs
the same `JobRunner` as the embedded worker, with `RayCompute` in place of `LocalCompute`, so
every file is written by the same code. Each `ModelActor` loads the workspace's base model once
and keeps it resident (its own `EvalSession` and holder); it computes merges, evaluations and
sweep trials and returns picklable results (`ComputedMerge`, `EvaluationResult`,
`TrialOutcome`). Caches written while computing (reference and base metrics, Gram matrices,
converted models) are written by actors, atomically and under file locks, as in one process;
a saved adapter's tensors are streamed by the actor into the run's hidden temp directory,
which the control plane renames into place with the bundle.

- `ActorPool`: the actors, who is idle, and their replacement when one dies (killed, out of
  memory, node lost). A blocking `acquire` (a merge, or a sweep with nothing running) goes
  before a sweep's `try_acquire` for more parallelism, so a merge submitted during a sweep
  starts as soon as one trial finishes.
- `RayCompute`: merges and evaluations on one actor (progress polled about once a second,
  cancel forwarded to it), and `RayTrials`, the sweeps' trial runner on every idle actor.
- `RayExecutor`: the service's executor. It connects to Ray (`local` starts one; `auto` or
  an address joins a cluster), starts the actors, and runs up to one job per actor at a time,
  oldest first, each in a thread of this process.

Actors are threaded (`max_concurrency` 4): a cancel or a progress query is answered while a
job runs. Paths sent to actors are absolute; the workspace, adapters, data and artifacts must
be on storage every node sees at the same paths.
"""

from __future__ import annotations

import gc
import logging
import os
import platform
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import sessionmaker

from app import crud
from app.errors import WorkerDied
from app.settings import Settings
from app.worker import (
    ComputedMerge,
    JobPlan,
    JobRunner,
    compute_evaluation,
    compute_merge,
    restore_if_needed,
)
from app.worker_process import POLL_S, STOP_TIMEOUT_S, WorkerState, inspect_model, model_name
from merging_core.adapters import AdapterCache
from merging_core.engine.plan import MergePlan
from merging_core.errors import Cancelled
from merging_core.evaluation.results import EvaluationResult
from merging_core.evaluation.workspace import Workspace, load_workspace
from merging_core.evaluation.writer import EvalWriter, IndexListener
from merging_core.runtime.cancel import CancelToken, Progress
from merging_core.search.sweep import TrialOutcome, TrialRequest, compute_trial

log = logging.getLogger(__name__)

PROGRESS_POLL_S = 1.0  # a merge's or evaluation's progress is read from its actor this often
WAIT_S = 0.2  # waits on actors wake this often to look at cancel tokens
MAX_ACTOR_DEATHS = 3  # deaths of the actor running a trial or job before it fails
ACTOR_CONCURRENCY = 4  # one call computes; the others are cancel, progress, info


# --- the actor ----------------------------------------------------------------------------------


class ModelActor:
    """One resident base model in a Ray actor; computes, never writes a result."""

    def __init__(self, settings: Settings, name: str, threads: int) -> None:
        import torch

        from merging_core.evaluation.evaluate import EvalSession
        from merging_core.runtime.memory import release_freed_memory_promptly

        logging.basicConfig(level=logging.INFO,
                            format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s")
        release_freed_memory_promptly()
        torch.set_num_threads(threads)
        self.name = name
        self.threads = threads
        workspace = load_workspace(settings.workspace_file())
        self.session = EvalSession.from_workspace(workspace, settings.artifacts_dir, device=settings.device,
                                                  dtype=settings.dtype)
        self.tokens: dict[str, CancelToken] = {}
        self.cancels_received = 0  # cancels of this actor's calls (see inspect)
        self.cancelled_early: set[str] = set()
        self.progress_of: dict[str, tuple[int, int, str, dict[str, Any]]] = {}
        gc.collect()
        gc.freeze()

    def ready(self) -> dict[str, Any]:
        from merging_core.evaluation.holder import ModelHolder

        return {
            "name": self.name,
            "device": str(self.session.holder.device),
            "model": model_name(self.session.workspace),
            "resident": True,
            "pid": os.getpid(),
            "node": platform.node(),
            "cwd": os.getcwd(),
            "threads": self.threads,
            "model_loads": ModelHolder.load_count,
            "artifacts_dir": str(self.session.root),
        }

    @contextmanager
    def _call(self, call_id: str, job_id: str) -> Iterator[tuple[CancelToken, Progress]]:
        token = self.tokens[call_id] = CancelToken()
        if call_id in self.cancelled_early:  # the cancel came before the call started
            token.cancel()

        def progress(done: int, total: int, message: str, extra: dict[str, Any]) -> None:
            self.progress_of[call_id] = (done, total, message, extra)

        try:
            yield token, progress
        finally:
            self.tokens.pop(call_id, None)
            self.progress_of.pop(call_id, None)
            self.cancelled_early.discard(call_id)
            restore_if_needed(self.session, job_id)

    def merge(self, call_id: str, job_id: str, plan: MergePlan) -> ComputedMerge:
        with self._call(call_id, job_id) as (cancel, progress):
            return compute_merge(self.session, job_id, plan, cancel, progress)

    def evaluate(self, call_id: str, job_id: str, plan: MergePlan) -> EvaluationResult:
        with self._call(call_id, job_id) as (cancel, progress):
            return compute_evaluation(self.session, job_id, plan, cancel, progress)

    def trial(self, call_id: str, job_id: str, request: TrialRequest) -> TrialOutcome:
        with self._call(call_id, job_id) as (cancel, _):
            outcome = compute_trial(self.session, request, cancel)
        outcome.worker = self.name
        return outcome

    def cancel(self, call_id: str) -> None:
        """Stop a call at its next batch (the weights are restored), or at its start if it
        has not started yet. Call ids are unique, so a cancel never outlives its call."""
        self.cancels_received += 1
        token = self.tokens.get(call_id)
        if token is not None:
            token.cancel()
        elif len(self.cancelled_early) < 10_000:
            self.cancelled_early.add(call_id)

    def progress(self, call_id: str) -> tuple[int, int, str, dict[str, Any]] | None:
        return self.progress_of.get(call_id)

    def inspect(self) -> dict[str, Any]:
        return {**inspect_model(self.session.holder), "name": self.name,
                "cancels_received": self.cancels_received}


# --- the pool -------------------------------------------------------------------------------------


@dataclass(eq=False)
class ActorSlot:
    """One actor: its handle, what it reported once its model was resident, and whether a job
    holds it."""

    index: int
    handle: Any
    info: dict[str, Any] | None = None
    busy: bool = False
    dead: bool = False

    @property
    def ready(self) -> bool:
        return self.info is not None and not self.dead


@dataclass
class PoolState(WorkerState):
    """`WorkerState` plus the actors (read by /healthz and /readyz)."""

    actors: list[dict[str, Any]] = field(default_factory=list)


class ActorPool:
    """The model actors. `acquire` waits for an idle actor; `try_acquire` takes one only if
    nobody waits; a dead actor is `replace`d by a new one with the same name."""

    def __init__(self, factory: Callable[[int], Any], size: int, state: PoolState) -> None:
        self.factory = factory
        self.state = state
        self.cond = threading.Condition()
        self.slots: list[ActorSlot] = []
        self.waiting = 0
        self.closed = False
        for index in range(size):
            self.slots.append(self._launch(index))
        self._publish()

    def _launch(self, index: int) -> ActorSlot:
        slot = ActorSlot(index, self.factory(index))
        threading.Thread(target=self._await_ready, args=(slot,), name=f"ray-actor-{index}-ready",
                         daemon=True).start()
        return slot

    def _await_ready(self, slot: ActorSlot) -> None:
        import ray

        try:
            info = ray.get(slot.handle.ready.remote())
        except Exception as exc:  # noqa: BLE001 - reported by /readyz
            if self.closed or slot.dead:
                return
            log.error("actor %d could not load the model: %s", slot.index, exc)
            with self.cond:
                slot.dead = True
                self.state.error = f"actor {slot.index}: {_cause(exc)}"
                self._publish()
                self.cond.notify_all()
            return
        with self.cond:
            slot.info = info
            self._publish()
            self.cond.notify_all()
        log.info("actor %s resident on %s (pid %s, node %s)", info["name"], info["device"], info["pid"],
                 info["node"])

    def _publish(self) -> None:
        ready = [slot for slot in self.slots if slot.ready]
        self.state.actors = [{"name": f"actor-{slot.index}", "resident": slot.ready, "busy": slot.busy,
                              **({k: slot.info[k] for k in ("device", "pid", "node")} if slot.info else {})}
                             for slot in self.slots]
        self.state.ready = bool(ready)
        if ready:
            first = ready[0].info
            assert first is not None
            self.state.info = {"device": first["device"], "model": first["model"], "pid": first["pid"],
                               "model_loads": first["model_loads"]}

    def acquire(self, cancel: CancelToken | None = None) -> ActorSlot:
        with self.cond:
            self.waiting += 1
            try:
                while True:
                    if self.closed or (cancel is not None and cancel.cancelled):
                        raise Cancelled("cancelled while waiting for an actor")
                    if all(slot.dead for slot in self.slots):  # every actor failed to load
                        raise WorkerDied(f"no model actor is running: {self.state.error}")
                    slot = self._idle()
                    if slot is not None:
                        return slot
                    self.cond.wait(WAIT_S)
            finally:
                self.waiting -= 1

    def try_acquire(self) -> ActorSlot | None:
        with self.cond:
            return None if self.waiting or self.closed else self._idle()

    def _idle(self) -> ActorSlot | None:
        for slot in self.slots:
            if slot.ready and not slot.busy:
                slot.busy = True
                self._publish()
                return slot
        return None

    def release(self, slot: ActorSlot) -> None:
        with self.cond:
            slot.busy = False
            self._publish()
            self.cond.notify_all()

    def replace(self, slot: ActorSlot) -> None:
        """A dead actor's place goes to a new actor, which loads the model again."""
        import ray

        with self.cond:
            if slot.dead or self.closed:
                return
            slot.dead = True
            log.error("actor %d died; starting a new one", slot.index)
            self.state.restarts += 1
            try:
                ray.kill(slot.handle, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
            self.slots[slot.index] = self._launch(slot.index)
            self._publish()

    def close(self) -> None:
        import ray

        with self.cond:
            self.closed = True
            self.cond.notify_all()
            for slot in self.slots:
                slot.dead = True
                try:
                    ray.kill(slot.handle, no_restart=True)
                except Exception:  # noqa: BLE001 - already gone
                    pass
            self.state.ready = False


def _cause(exc: BaseException) -> BaseException:
    """The exception an actor raised (a `RayTaskError` wraps it)."""
    from ray.exceptions import RayTaskError

    if isinstance(exc, RayTaskError):
        cause = exc.as_instanceof_cause()
        return getattr(cause, "cause", None) or cause
    return exc


def _actor_died(exc: BaseException) -> bool:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return isinstance(exc, (RayActorError, ActorDiedError, ActorUnavailableError))


def _match_head_authentication() -> None:
    """Ray >= 2.52 token authentication, as a head on this machine decides it.

    `ray start --head` turns token authentication on when `RAY_AUTH_MODE` is unset and a token is
    found (`RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH`, or `~/.ray/auth_token`, which a local
    `ray.init()` writes), but `ray.init(address="host:port")` never does, so the service could not
    join such a head (`InvalidAuthToken`). Apply the head's rule before joining; an explicit
    `RAY_AUTH_MODE` wins. Ray has no public call for it, hence the private import (absent from
    Rays without token authentication)."""
    if os.environ.get("RAY_AUTH_MODE") is not None:
        return
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:
        return
    if maybe_enable_token_auth_if_token_available(warn_if_disabled=False):
        log.info("a Ray token was found: joining with token authentication (RAY_AUTH_MODE=token)")


# --- computing on actors --------------------------------------------------------------------------


class RayCompute:
    """The `Compute` of the control plane: every call runs on an actor of the pool."""

    def __init__(self, pool: ActorPool, workspace: Workspace, adapter_cache: AdapterCache) -> None:
        self.pool = pool
        self.workspace = workspace
        self.adapter_cache = adapter_cache

    def merge(self, job_id: str, plan: MergePlan, cancel: CancelToken, progress: Progress) -> ComputedMerge:
        result: ComputedMerge = self._call(job_id, "merge", plan, cancel, progress)
        return result

    def evaluate(self, job_id: str, plan: MergePlan, cancel: CancelToken,
                 progress: Progress) -> EvaluationResult:
        result: EvaluationResult = self._call(job_id, "evaluate", plan, cancel, progress)
        return result

    @contextmanager
    def trials(self, job_id: str) -> Iterator[RayTrials]:
        trials = RayTrials(self.pool, job_id)
        try:
            yield trials
        finally:
            trials.close()

    def _call(self, job_id: str, method: str, plan: MergePlan, cancel: CancelToken, progress: Progress) -> Any:
        """One call on one actor: progress read about once a second, cancel forwarded, and a
        dead actor's call run again on another (at most MAX_ACTOR_DEATHS deaths)."""
        import ray

        deaths = 0
        while True:
            slot = self.pool.acquire(cancel)
            call_id = new_call_id(job_id)
            ref = getattr(slot.handle, method).remote(call_id, job_id, plan)
            forwarded = False
            try:
                while True:
                    if cancel.cancelled and not forwarded:
                        slot.handle.cancel.remote(call_id)
                        forwarded = True
                    done, _ = ray.wait([ref], timeout=PROGRESS_POLL_S if not cancel.cancelled else WAIT_S)
                    if done:
                        return ray.get(ref)
                    try:
                        latest = ray.get(slot.handle.progress.remote(call_id), timeout=PROGRESS_POLL_S)
                    except Exception:  # noqa: BLE001 - the call's own result tells what happened
                        latest = None
                    if latest is not None:
                        progress(*latest)
            except Exception as exc:  # noqa: BLE001 - sorted below
                if not _actor_died(exc):
                    self.pool.release(slot)
                    raise _cause(exc) from None
                self.pool.replace(slot)
                deaths += 1
                if cancel.cancelled:
                    raise Cancelled("cancelled; its actor died") from None
                if deaths >= MAX_ACTOR_DEATHS:
                    raise WorkerDied(f"the actor running this job died {deaths} times (killed, or out of "
                                     "memory); not retried again") from None
                log.warning("job %s: its actor died; running it again on another", job_id)
            finally:
                if not slot.dead and slot.busy:
                    self.pool.release(slot)


def new_call_id(job_id: str) -> str:
    """A unique id for one call on an actor (what a cancel names)."""
    return f"{job_id}:{uuid.uuid4().hex[:12]}"


@dataclass
class _Running:
    slot: ActorSlot
    request: TrialRequest
    call_id: str
    deaths: int = 0


class RayTrials:
    """A sweep's `TrialRunner` on the actor pool: as many trials at once as there are idle
    actors (one waits for room when none runs); a trial whose actor dies runs again on another."""

    def __init__(self, pool: ActorPool, job_id: str) -> None:
        self.pool = pool
        self.job_id = job_id
        self.reserved: list[ActorSlot] = []
        self.running: dict[Any, _Running] = {}  # object ref -> the trial it computes

    def capacity(self, in_flight: int, cancel: CancelToken | None) -> int:
        if in_flight == 0 and not self.reserved:
            self.reserved.append(self.pool.acquire(cancel))
        while (slot := self.pool.try_acquire()) is not None:
            self.reserved.append(slot)
        return len(self.reserved)

    def submit(self, request: TrialRequest, deaths: int = 0) -> None:
        slot = self.reserved.pop()
        call_id = new_call_id(self.job_id)
        ref = slot.handle.trial.remote(call_id, self.job_id, request)
        self.running[ref] = _Running(slot, request, call_id, deaths)

    def wait(self, cancel: CancelToken | None) -> tuple[TrialRequest, TrialOutcome]:
        import ray

        self._release_reserved()
        while True:
            if cancel is not None and cancel.cancelled:
                self._stop_running()
                raise Cancelled("cancelled")
            done, _ = ray.wait(list(self.running), num_returns=1, timeout=WAIT_S)
            if not done:
                continue
            running = self.running.pop(done[0])
            try:
                outcome: TrialOutcome = ray.get(done[0])
            except Exception as exc:  # noqa: BLE001 - sorted below
                if not _actor_died(exc):
                    self.pool.release(running.slot)
                    self._stop_running()
                    raise _cause(exc) from None
                self.pool.replace(running.slot)
                if running.deaths + 1 >= MAX_ACTOR_DEATHS:
                    self._stop_running()
                    raise WorkerDied(f"trial {running.request.index}: its actor died {running.deaths + 1} "
                                     "times (killed, or out of memory); not retried again") from None
                log.warning("trial %d of job %s: its actor died; running it again on another",
                            running.request.index, self.job_id)
                self.reserved.append(self.pool.acquire(cancel))
                self.submit(running.request, running.deaths + 1)
                continue
            self.pool.release(running.slot)
            return running.request, outcome

    def _release_reserved(self) -> None:
        while self.reserved:
            self.pool.release(self.reserved.pop())

    def _stop_running(self) -> None:
        """Cancel every running trial and wait for it: each stops at its next batch, weights
        restored, and its actor is free again."""
        import ray

        for running in self.running.values():
            running.slot.handle.cancel.remote(running.call_id)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for ref, running in list(self.running.items()):
            try:
                ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
            except Exception as exc:  # noqa: BLE001 - cancelled, failed or dead: all done
                if _actor_died(exc):
                    self.pool.replace(running.slot)
                    continue
            self.pool.release(running.slot)
        self.running.clear()

    def close(self) -> None:
        self._release_reserved()
        if self.running:
            self._stop_running()


# --- the executor ---------------------------------------------------------------------------------


def _absolute(settings: Settings) -> Settings:
    """The settings an actor gets: every path absolute, resolved here (actors run elsewhere)."""
    return settings.model_copy(update={
        "workspace": settings.workspace_file().resolve(),
        "artifacts_dir": settings.artifacts_dir.resolve(),
    })


class RayExecutor:
    """The service's `Executor` on Ray: model actors compute, this process writes."""

    def __init__(self, settings: Settings, db: sessionmaker, workspace: Workspace,
                 adapter_cache: AdapterCache, index_listener: IndexListener | None = None) -> None:
        self.settings = settings
        self.db = db
        self.workspace = workspace
        self.adapter_cache = adapter_cache
        self.index_listener = index_listener
        self.state = PoolState()
        self.pool: ActorPool | None = None
        self.runner: JobRunner | None = None
        self.plans: dict[str, JobPlan] = {}
        self.jobs: dict[str, threading.Thread] = {}
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._dispatcher = threading.Thread(target=self._dispatch, name="ray-dispatcher", daemon=True)
        self._started_ray = False
        self._close_lock = threading.Lock()
        self._closed = False
        self.gpus_per_worker = 0.0

    # --- Executor ---------------------------------------------------------------------------

    def start(self) -> None:
        self._dispatcher.start()

    def submit(self, job_id: str, plan: JobPlan | None = None) -> None:
        if plan is not None:
            self.plans[job_id] = plan
        self._wake.set()

    def cancel(self, job_id: str) -> None:
        if self.runner is not None:
            self.runner.cancel(job_id)

    def stop(self) -> None:
        """Graceful: running jobs stop at their next batch or trial and are re-queued."""
        self._stopping.set()
        self._wake.set()
        if self.runner is not None:
            self.runner.shutdown()
        # The dispatcher waits for the job threads, then closes the actors and Ray (see `_dispatch`).
        self._dispatcher.join(STOP_TIMEOUT_S * 2)
        if self._dispatcher.is_alive():
            log.warning("the Ray dispatcher did not stop within %.0f s; closing Ray from here", STOP_TIMEOUT_S * 2)
            self._close()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self.state.wait_ready(timeout)

    def inspect(self, index: int = 0, timeout: float = 30.0) -> dict[str, Any]:
        """An actor's resident model state (see `inspect_model`)."""
        import ray

        assert self.pool is not None
        result: dict[str, Any] = ray.get(self.pool.slots[index].handle.inspect.remote(), timeout=timeout)
        return result

    # --- internals ------------------------------------------------------------------------------

    def _connect(self) -> int:
        """Join or start Ray; returns the number of actors to start."""
        import ray

        address = self.settings.ray_address
        if address != "local":
            _match_head_authentication()
        env = {name: os.environ[name] for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "LORA_MERGE_CACHE_DIR")
               if name in os.environ}
        ray.init(address=None if address == "local" else address, include_dashboard=False,
                 logging_level=logging.WARNING, runtime_env={"env_vars": env} if env else None,
                 ignore_reinit_error=True)
        self._started_ray = True
        gpus = int(ray.cluster_resources().get("GPU", 0))
        self.gpus_per_worker = (self.settings.ray_gpus_per_worker if self.settings.ray_gpus_per_worker is not None
                                else (1.0 if gpus else 0.0))
        if self.settings.ray_workers is not None:
            return self.settings.ray_workers
        if gpus and self.gpus_per_worker:
            return max(1, int(gpus // self.gpus_per_worker))
        return 1

    def _make_actor(self, settings: Settings) -> Callable[[int], Any]:
        import ray

        remote = ray.remote(ModelActor)
        threads = self.settings.worker_threads or 1

        def make(index: int) -> Any:
            return remote.options(
                num_cpus=threads if not self.gpus_per_worker else 1, num_gpus=self.gpus_per_worker,
                max_concurrency=ACTOR_CONCURRENCY, max_restarts=0,
                name=f"lora-merge-actor-{index}-{os.getpid()}-{time.monotonic_ns()}",
            ).remote(settings, f"actor-{index}", threads)

        return make

    def _start_actors(self) -> bool:
        try:
            size = self._connect()
            settings = _absolute(self.settings)
        except Exception as exc:  # noqa: BLE001 - reported by /readyz
            log.exception("could not start Ray")
            self.state.error = f"{type(exc).__name__}: {exc}"
            return False
        self.pool = ActorPool(self._make_actor(settings), size, self.state)
        writer = EvalWriter(settings.artifacts_dir, self.index_listener)
        self.runner = JobRunner(RayCompute(self.pool, self.workspace, self.adapter_cache), self.db,
                                settings.artifacts_dir, writer)
        log.info("Ray executor: %d actor(s), %s GPU(s) each", size, self.gpus_per_worker)
        return True

    def _dispatch(self) -> None:
        """Start Ray and the actors, then run queued jobs until stopped; close them on the way out.

        This thread both starts and stops Ray: a local Ray's processes die with the thread that
        started them (Ray starts them with PR_SET_PDEATHSIG), so were it to exit first, Ray would
        be gone under `ray.shutdown()` (the process exits abruptly) and its agents orphaned."""
        try:
            if self._start_actors():
                self._run_jobs()
        finally:
            for thread in list(self.jobs.values()):
                thread.join(STOP_TIMEOUT_S)
            self._close()

    def _run_jobs(self) -> None:
        assert self.pool is not None and self.runner is not None
        while not self._stopping.is_set():
            for job_id, thread in list(self.jobs.items()):
                if not thread.is_alive():
                    del self.jobs[job_id]
            if self.state.ready and len(self.jobs) < len(self.pool.slots):
                with self.db() as session:
                    queued = [job.id for job in crud.queued_jobs(session) if job.id not in self.jobs]
                for job_id in set(self.plans) - set(queued) - set(self.jobs):
                    self.plans.pop(job_id, None)
                for job_id in queued[: len(self.pool.slots) - len(self.jobs)]:
                    thread = threading.Thread(target=self.runner.execute,
                                              args=(job_id, self.plans.pop(job_id, None)),
                                              name=f"job-{job_id[:8]}", daemon=True)
                    self.jobs[job_id] = thread
                    thread.start()
            self._wake.wait(POLL_S)
            self._wake.clear()

    def _close(self) -> None:
        """Kill the actors and leave (or, for `local`, stop) Ray; once."""
        import ray

        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            if self.pool is not None:
                self.pool.close()
            if self._started_ray and ray.is_initialized():
                ray.shutdown()


__all__ = ["ActorPool", "ModelActor", "RayCompute", "RayExecutor", "RayTrials"]
