"""The service: settings, database, the workspace, and the worker process that holds the model.

Built in the app's lifespan. The API process loads no model: it validates requests by planning
them (adapters' factors loaded into `adapter_cache`, nothing computed), records jobs, and hands
them to the worker process through a `ProcessExecutor`, or (`executor: ray`) to the
`RayExecutor`, whose model actors compute while this process writes every result. `/healthz` answers at once; `/readyz`
turns 200 when the worker reports the model resident.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import sessionmaker

from app import crud
from app.db import make_engine, make_session_factory, upgrade_database
from app.settings import Settings
from app.worker_process import ProcessExecutor, requeue_interrupted
from merging_core.adapters import AdapterCache
from merging_core.evaluation.workspace import Workspace, load_workspace

if TYPE_CHECKING:
    from app.ray_executor import RayExecutor

log = logging.getLogger(__name__)


class Service:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        settings.artifacts_dir.mkdir(parents=True, exist_ok=True)
        self.artifacts_dir = settings.artifacts_dir.resolve()
        upgrade_database(settings.resolved_database_url)
        self.engine = make_engine(settings.resolved_database_url)
        self.db: sessionmaker = make_session_factory(self.engine)
        self.db_read: sessionmaker = make_session_factory(self.engine, read_only=True)
        self.workspace: Workspace = load_workspace(settings.workspace_file())
        # Validation plans requests against adapters loaded here; the model lives in the worker.
        self.adapter_cache = AdapterCache()
        self.executor: ProcessExecutor | RayExecutor
        if settings.executor == "ray":
            from app.ray_executor import RayExecutor

            self.executor = RayExecutor(settings, self.db, self.workspace, self.adapter_cache,
                                        index_listener=self._mirror)
        else:
            self.executor = ProcessExecutor(settings, self.db)

    def _mirror(self, index_path: Path, entry: dict[str, Any]) -> None:
        """The eval index's database mirror (the Ray executor writes the index here)."""
        with self.db() as session:
            crud.mirror_index_entry(session, index_path=index_path, entry=entry)

    @property
    def ready(self) -> bool:
        """Whether a model is resident in the worker (and jobs can run)."""
        return self.executor.state.ready

    @property
    def load_error(self) -> str | None:
        return self.executor.state.error

    def start(self) -> None:
        # Jobs a dead service left running go back to the queue; the worker takes them in order.
        requeued = requeue_interrupted(self.db, "re-queued after an interrupted run",
                                       max_attempts=self.settings.max_attempts)
        if requeued:
            log.info("%d interrupted job(s) re-queued", len(requeued))
        self.executor.start()
        # What is loaded now lives as long as the process: keep the cyclic GC's full
        # collections, which stop every thread, the event loop included, off it.
        gc.collect()
        gc.freeze()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self.executor.wait_ready(timeout)

    def stop(self) -> None:
        self.executor.stop()
        self.engine.dispose()
