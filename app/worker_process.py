"""The worker in a process of its own, and the supervisor that keeps it running.

The API process loads no model: the HTTP loop, its thread pool and a Python-heavy worker would
otherwise share one interpreter lock, and under load the API's tail latency grows without
bound. `ProcessExecutor` (in the API process) starts a child process (`worker_main`) that loads
the resident model once and runs jobs one at a time with a `JobRunner`.

The boundary is two queues and the database:
- jobs are durable in the database; the worker runs the oldest queued job, re-planning it
  from the stored request unless the API sent its plan (`("submit", job_id, plan)`: plans are
  picklable) -- the same boundary a Ray actor has;
- the inbox also carries `cancel`, `stop`, `pause`/`resume` (take no new job meanwhile: a
  drain for maintenance) and `inspect`; a listener thread in the worker handles
  them while the main thread runs a job, and a submit wakes an idle worker at once (it also
  polls the database every `POLL_S`);
- progress, results and the eval-index mirror are written to the database by the worker, so
  `GET /jobs/{id}` and its SSE stream read them as before;
- the outbox carries `ready` (device, model, loads) or `error` (the model could not load), and
  the answers to `inspect`.

If the worker dies (killed, out of memory), the supervisor re-queues its running job
(`attempts` + 1 when it runs again), starts a new worker, and the API answers meanwhile with
`/readyz` 503 until the model is resident again. `stop()` (SIGTERM to the service) asks the
worker to stop: the running job is cancelled at its next batch or trial, its weights restored,
nothing half-written, and it goes back to the queue, so the next start resumes it.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import torch
from sqlalchemy.orm import sessionmaker

from app import crud
from app.db import JobStatus, make_engine, make_session_factory
from app.settings import Settings
from app.worker import JobPlan, JobRunner, LocalCompute

log = logging.getLogger(__name__)

POLL_S = 0.1  # the worker looks for queued jobs at least this often
SUPERVISE_S = 0.2  # the supervisor checks the worker this often
STOP_TIMEOUT_S = 60.0  # a graceful stop waits this long for the running batch or trial
_CONTEXT = multiprocessing.get_context("spawn")  # torch and threads: never fork


# --- the worker process ------------------------------------------------------------------------


def worker_main(settings: Settings, inbox: Any, outbox: Any) -> None:
    """The child process: load the model, then run queued jobs until told to stop."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(name)s: %(message)s")
    from merging_core.evaluation.evaluate import EvalSession
    from merging_core.evaluation.holder import ModelHolder
    from merging_core.evaluation.workspace import load_workspace
    from merging_core.runtime.memory import release_freed_memory_promptly

    _exit_with_parent()
    stopping = threading.Event()
    paused = threading.Event()
    wake = threading.Event()
    runners: list[JobRunner] = []  # the runner, once the model is loaded

    def stop(*_: Any) -> None:
        stopping.set()
        for runner in runners:
            runner.shutdown()  # the running job stops at its next batch or trial, re-queued
        wake.set()

    # Ctrl-C reaches the whole process group: the service decides when the worker stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, stop)
    release_freed_memory_promptly()
    torch.set_num_threads(settings.worker_threads or worker_threads_default())
    engine = make_engine(settings.resolved_database_url)
    db: sessionmaker = make_session_factory(engine)
    db_read: sessionmaker = make_session_factory(engine, read_only=True)

    def mirror(index_path: Any, entry: dict[str, Any]) -> None:
        with db() as session:
            crud.mirror_index_entry(session, index_path=index_path, entry=entry)

    try:
        workspace = load_workspace(settings.workspace_file())
        evaluator = EvalSession.from_workspace(
            workspace, settings.artifacts_dir.resolve(), device=settings.device, dtype=settings.dtype,
            index_listener=mirror,
        )
    except Exception as exc:  # noqa: BLE001 - reported by /readyz instead of a crash loop
        log.exception("could not load the base model")
        outbox.put(("error", f"{type(exc).__name__}: {exc}"))
        return
    # Everything loaded so far lives as long as the process: keep the cyclic GC off it.
    gc.collect()
    gc.freeze()
    runner = JobRunner(LocalCompute(evaluator), db, evaluator.root, evaluator.writer)
    runners.append(runner)
    if stopping.is_set():  # asked to stop while the model was loading
        return
    plans: dict[str, JobPlan] = {}
    holder = evaluator.holder
    outbox.put(("ready", {"device": str(holder.device), "model": model_name(workspace),
                          "pid": os.getpid(), "model_loads": ModelHolder.load_count}))

    def listen() -> None:
        while True:
            message = inbox.get()
            kind = message[0]
            if kind == "submit":
                plans[message[1]] = message[2]
                wake.set()
            elif kind == "cancel":
                plans.pop(message[1], None)
                runner.cancel(message[1])
            elif kind == "pause":
                paused.set()
                outbox.put(("paused", True))
            elif kind == "resume":
                paused.clear()
                wake.set()
            elif kind == "inspect":
                outbox.put(("inspect", inspect_model(holder)))
            elif kind == "stop":
                stop()
                return

    threading.Thread(target=listen, name="worker-inbox", daemon=True).start()
    while not stopping.is_set():
        queued = [] if paused.is_set() else _queued(db_read)
        # Plans of jobs no longer queued (cancelled while queued, or taken before their plan
        # arrived) are dropped, so the map holds at most the queue.
        for job_id in set(plans) - set(queued):
            plans.pop(job_id, None)
        if not queued:
            wake.wait(POLL_S)
            wake.clear()
            continue
        runner.execute(queued[0], plans.pop(queued[0], None))
    engine.dispose()


def worker_threads_default() -> int:
    """The cores this process may use, less one for the API (at least 1). Measured: with both
    of 2 cores the worker kept 47-56% of its unloaded trials/s under API load, with one 84-97%."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, usable - 1)


def model_name(workspace: Any) -> str:
    """The base model's name as the workspace gives it (a GGUF's file stem, not its cache path)."""
    base = workspace.spec.base_model
    return Path(base.gguf).stem if base.gguf else workspace.base_model_path().name


def _exit_with_parent() -> None:
    """A worker whose service is gone (e.g. kill -9) exits at once instead of running on: the
    next service re-queues its job, as after a kill -9 of a single process."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="worker-parent-watch", daemon=True).start()


def _queued(db_read: sessionmaker) -> list[str]:
    """Ids of the queued jobs, oldest first (a deferred read: never takes the write lock)."""
    with db_read() as session:
        return [job.id for job in crud.queued_jobs(session)]


def inspect_model(holder: Any) -> dict[str, Any]:
    """The resident model's state, for checks from the API process: a digest of every weight,
    and whether anything a job changes (weights, gradient flags, hooks) was left changed."""
    with holder.lock:  # between jobs' changes, never in the middle of one
        digest = hashlib.sha256()
        for name, tensor in sorted(holder.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return {
            "weights_sha256": digest.hexdigest(),
            "pristine": holder.is_pristine,
            "requires_grad": all(p.requires_grad for p in holder.model.parameters()),
            "hooks": sum(len(m._forward_hooks) for m in holder.model.modules()),
        }


# --- the supervisor, in the API process ----------------------------------------------------------


@dataclass
class WorkerState:
    """What the API knows of its worker (read by /readyz and /healthz)."""

    ready: bool = False
    error: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    restarts: int = 0

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until a model is resident (True) or it could not load or time ran out (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.ready and self.error is None:
            if deadline is not None and time.monotonic() > deadline:
                break
            time.sleep(0.05)
        return self.ready


class ProcessExecutor:
    """Starts and supervises the worker process; the `Executor` of the embedded service."""

    def __init__(self, settings: Settings, db: sessionmaker) -> None:
        self.settings = settings
        self.db = db
        self.state = WorkerState()
        self._process: BaseProcess | None = None
        self._inbox: Any = None
        self._outbox: Any = None
        self._replies: queue.Queue[dict[str, Any]] = queue.Queue()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._supervisor = threading.Thread(target=self._supervise, name="worker-supervisor", daemon=True)

    # --- Executor --------------------------------------------------------------------------------

    def start(self) -> None:
        self._spawn()
        self._supervisor.start()

    def submit(self, job_id: str, plan: JobPlan | None = None) -> None:
        self._send(("submit", job_id, plan))

    def cancel(self, job_id: str) -> None:
        self._send(("cancel", job_id))

    def stop(self) -> None:
        """Graceful: the running job stops at its next batch or trial and is re-queued."""
        self._stopping.set()
        process = self._process
        if process is None:
            return
        if not self.state.ready:  # still loading the model: no job to save, stop it at once
            process.kill()
        self._send(("stop",))
        process.join(STOP_TIMEOUT_S)
        if process.is_alive():
            log.error("the worker did not stop within %.0f s; terminating it", STOP_TIMEOUT_S)
            process.terminate()
            process.join(5)
        self._supervisor.join(2)

    # --- for checks ----------------------------------------------------------------------------

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self.state.wait_ready(timeout)

    def inspect(self, timeout: float = 30.0) -> dict[str, Any]:
        """The resident model's state (see `inspect_model`), from the worker."""
        self._send(("inspect",))
        return self._replies.get(timeout=timeout)

    @contextmanager
    def paused(self, timeout: float = 30.0) -> Iterator[None]:
        """The worker takes no new job for the block (the running one goes on): a drain."""
        self._send(("pause",))
        self._replies.get(timeout=timeout)
        try:
            yield
        finally:
            self._send(("resume",))

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    # --- internals -----------------------------------------------------------------------------

    def _send(self, message: tuple[Any, ...]) -> None:
        with self._lock:
            if self._inbox is not None:
                self._inbox.put(message)

    def _spawn(self) -> None:
        with self._lock:
            for old in (self._inbox, self._outbox):  # a dead worker's queues: never read again
                if old is not None:
                    old.cancel_join_thread()
                    old.close()
            self._inbox, self._outbox = _CONTEXT.Queue(), _CONTEXT.Queue()
            self._process = _CONTEXT.Process(target=worker_main, args=(self.settings, self._inbox, self._outbox),
                                             name="lora-merge-worker", daemon=True)
            self._process.start()
        log.info("worker process %s started", self._process.pid)

    def _read_outbox(self) -> None:
        while True:
            try:
                kind, payload = self._outbox.get_nowait()
            except (queue.Empty, OSError, ValueError):
                return
            if kind == "ready":
                self.state.info, self.state.ready, self.state.error = payload, True, None
                log.info("model resident in worker %s on %s", payload["pid"], payload["device"])
            elif kind == "error":
                self.state.error, self.state.ready = payload, False
            elif kind in ("inspect", "paused"):
                self._replies.put(payload)

    def _supervise(self) -> None:
        failures = 0  # deaths in a row without the model becoming resident
        while not self._stopping.is_set():
            self._read_outbox()
            process = self._process
            if process is not None and not process.is_alive() and not self._stopping.is_set():
                self._read_outbox()
                if self.state.error is not None:
                    log.error("the worker could not load the model: %s", self.state.error)
                    return  # a configuration error: restarting would fail the same way
                log.error("the worker process died (exit code %s); re-queuing its job and restarting",
                          process.exitcode)
                # A worker that dies before its model is resident again waits longer each time.
                failures = 0 if self.state.ready else failures + 1
                self.state.ready = False
                requeue_interrupted(self.db, "re-queued: the worker process died",
                                    max_attempts=self.settings.max_attempts)
                self.state.restarts += 1
                if failures and self._stopping.wait(min(2.0 ** failures, 30.0)):
                    break
                self._spawn()
            self._stopping.wait(SUPERVISE_S)
        self._read_outbox()


def requeue_interrupted(db: sessionmaker, message: str, *, max_attempts: int) -> list[str]:
    """Jobs left `running` by a worker that is gone go back to the queue (a sweep resumes from
    its trials on disk; `attempts` grows when they run again). A job whose cancel was asked for
    is cancelled instead, and one that has been attempted `max_attempts` times fails (a job that
    kills its worker, e.g. out of memory, would otherwise be retried forever)."""
    requeued = []
    with db() as session:
        for job in crud.interrupted_jobs(session):
            if job.cancel_requested:
                crud.transition(session, job_id=job.id, status=JobStatus.CANCELLED,
                                progress_message="cancelled; its worker had stopped")
            elif job.attempts >= max_attempts:
                log.error("job %s stopped its worker %d times; failing it", job.id, job.attempts)
                crud.transition(session, job_id=job.id, status=JobStatus.FAILED, progress_message="failed",
                                error={"type": "WorkerDied", "status": 500, "detail": (
                                    f"the worker process stopped {job.attempts} times while running "
                                    "this job (killed, or out of memory); not retried again")})
            else:
                log.warning("re-queuing interrupted job %s (%s)", job.id, job.kind)
                crud.transition(session, job_id=job.id, status=JobStatus.QUEUED, progress_message=message)
                requeued.append(job.id)
    return requeued
