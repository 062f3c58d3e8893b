"""The service: settings, database, the resident model (an EvalSession) and the executor.

Built in the app's lifespan; the model loads in a background thread so `/healthz` answers at
once and `/readyz` turns 200 when the model is resident.
"""

from __future__ import annotations

import gc
import logging
import threading
from pathlib import Path

from sqlalchemy.orm import sessionmaker

from app import crud
from app.db import make_engine, make_session_factory, upgrade_database
from app.settings import Settings
from app.worker import Executor, InProcessExecutor, JobRunner, recover
from merging_core.adapters import AdapterCache
from merging_core.evaluation.evaluate import EvalSession
from merging_core.runtime.memory import release_freed_memory_promptly
from merging_core.evaluation.workspace import Workspace, load_workspace

log = logging.getLogger(__name__)


class Service:
    def __init__(self, settings: Settings) -> None:
        release_freed_memory_promptly()
        self.settings = settings
        settings.artifacts_dir.mkdir(parents=True, exist_ok=True)
        self.artifacts_dir = settings.artifacts_dir.resolve()
        upgrade_database(settings.resolved_database_url)
        self.engine = make_engine(settings.resolved_database_url)
        self.db: sessionmaker = make_session_factory(self.engine)
        self.db_read: sessionmaker = make_session_factory(self.engine, read_only=True)
        self.workspace: Workspace = load_workspace(settings.workspace)
        # Validation plans requests against adapters loaded here, not in the model's session.
        self.adapter_cache = AdapterCache()
        self.evaluator: EvalSession | None = None
        self.executor: Executor | None = None
        self.load_error: str | None = None
        self._loader = threading.Thread(target=self._load, name="model-loader", daemon=True)

    def start(self) -> None:
        self._loader.start()

    def _load(self) -> None:
        try:
            evaluator = EvalSession.from_workspace(
                self.workspace, self.artifacts_dir, device=self.settings.device,
                dtype=self.settings.dtype, index_listener=self._mirror,
            )
            # Everything loaded so far (torch, transformers, the model) lives for the whole
            # process; freezing it keeps the cyclic GC's full collections, which stop every
            # thread, the event loop included, from re-scanning it while jobs run.
            gc.collect()
            gc.freeze()
            executor = InProcessExecutor(JobRunner(evaluator, self.db))
            executor.start()
            self.executor = executor
            self.evaluator = evaluator
            requeued = recover(self.db, executor)
            log.info("model resident on %s; %d queued job(s) submitted", evaluator.holder.device,
                     len(requeued))
        except Exception as exc:  # noqa: BLE001 - reported by /readyz instead of crashing
            log.exception("could not load the base model")
            self.load_error = f"{type(exc).__name__}: {exc}"

    def _mirror(self, index_path: Path, entry: dict) -> None:
        with self.db() as db:
            crud.mirror_index_entry(db, index_path=index_path, entry=entry)

    def wait_ready(self, timeout: float | None = None) -> bool:
        self._loader.join(timeout)
        return self.evaluator is not None

    def stop(self) -> None:
        if self.executor is not None:
            self.executor.stop()
        self.engine.dispose()
