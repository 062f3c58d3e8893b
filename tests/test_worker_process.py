"""The worker in its own process: killed, it comes back and the sweep finishes; stopped, its job
goes back to the queue with nothing half-written and the next start resumes it."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from app.db import Job, make_engine, make_session_factory
from app.settings import Settings
from tests.service_helpers import thread_server, wait_job

SWEEP = {"adapters": ["topic", "mood"], "method": "weighted_delta",
         "search": {"type": "grid", "grid": {"lambda": [i / 60 for i in range(60)]}}}


@pytest.fixture
def settings(tiny_workspace: Path, tmp_path: Path) -> Settings:
    return Settings(workspace=tiny_workspace, artifacts_dir=tmp_path / "artifacts")


def _trial_files(artifacts: Path) -> list[Path]:
    return sorted(artifacts.glob("merged/weighted_delta/mood_topic/sweeps/sweep_*/trials/trial_*.json"))


def _wait_done(client: httpx.Client, job_id: str, at_least: int) -> None:
    deadline = time.monotonic() + 120
    while client.get(f"/jobs/{job_id}").json()["progress"]["done"] < at_least:
        assert time.monotonic() < deadline, "the sweep made no progress"
        time.sleep(0.05)


def test_a_killed_worker_comes_back_and_the_sweep_finishes(settings: Settings) -> None:
    with thread_server(settings) as (client, app):
        worker = app.state.service.executor
        first_pid = worker.pid
        job_id = client.post("/sweeps", json=SWEEP).json()["id"]
        _wait_done(client, job_id, 3)

        # Poll the API for the whole outage: it must answer every request.
        answers: list[int] = []
        stop = threading.Event()

        def poll() -> None:
            while not stop.is_set():
                answers.append(client.get(f"/jobs/{job_id}").status_code)
                answers.append(client.get("/healthz").status_code)
                time.sleep(0.02)

        poller = threading.Thread(target=poll)
        poller.start()
        try:
            os.kill(first_pid, signal.SIGKILL)
            deadline = time.monotonic() + 120
            while worker.pid == first_pid or not worker.state.ready:
                assert time.monotonic() < deadline, "the worker did not come back"
                time.sleep(0.05)
            job = wait_job(client, job_id, timeout=180)
        finally:
            stop.set()
            poller.join()
        assert answers and set(answers) == {200}
        assert worker.state.restarts == 1 and worker.pid != first_pid
        assert job["status"] == "succeeded" and job["attempts"] == 2
        assert job["result"]["resumed_trials"] >= 3
        trials = client.get(f"/sweeps/{job_id}/trials").json()["trials"]
        assert [t["index"] for t in trials] == list(range(60))  # every trial once
        assert len(_trial_files(settings.artifacts_dir)) == 60
        index = json.loads(next(settings.artifacts_dir.glob("merged/*/*/eval/index.json")).read_text())
        assert len({entry["id"] for entry in index}) == len(index) == 60
        assert worker.inspect()["pristine"]


def test_a_graceful_stop_requeues_the_job_and_the_next_start_resumes_it(
    tiny_workspace: Path, tmp_path: Path, executor_settings: dict[str, object],
) -> None:
    settings = Settings(workspace=tiny_workspace, artifacts_dir=tmp_path / "artifacts", **executor_settings)
    with thread_server(settings) as (client, _):
        job_id = client.post("/sweeps", json=SWEEP).json()["id"]
        _wait_done(client, job_id, 3)
    # The server stopped (lifespan shutdown, as on SIGTERM): the job waits in the queue.
    artifacts = settings.artifacts_dir
    assert not [p for p in artifacts.rglob("*") if p.name.startswith((".tmp", "tmp"))], "half-written files"
    finished = {p.name: p.read_bytes() for p in _trial_files(artifacts)}
    assert 3 <= len(finished) < 60
    engine = make_engine(settings.resolved_database_url)
    with make_session_factory(engine)() as session:
        stopped = session.get(Job, job_id)
        assert stopped is not None and stopped.status == "queued" and stopped.attempts == 1
        assert "re-queued: the service stopped" in stopped.progress_message
    engine.dispose()
    with thread_server(settings) as (client, _):
        queued = client.get(f"/jobs/{job_id}").json()
        assert queued["status"] in ("queued", "running", "succeeded")
        job = wait_job(client, job_id, timeout=180)
        assert job["status"] == "succeeded" and job["attempts"] == 2
        assert job["result"]["resumed_trials"] == len(finished)
        after = {p.name: p.read_bytes() for p in _trial_files(artifacts)}
        assert len(after) == 60 and all(after[name] == data for name, data in finished.items())


def test_requeue_fails_a_job_that_keeps_killing_its_worker_and_cancels_a_cancelled_one(tmp_path: Path) -> None:
    from app import crud
    from app.db import JobKind, JobStatus, upgrade_database
    from app.worker_process import requeue_interrupted

    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    upgrade_database(url)
    engine = make_engine(url)
    db = make_session_factory(engine)
    with db() as session:
        ids = [crud.create_job(session, kind=JobKind.SWEEP, request={}, request_hash=str(i),
                               idempotency_key=None)[0].id for i in range(3)]
        for job_id in ids:  # each is running (its first attempt) when its worker dies
            crud.transition(session, job_id=job_id, status=JobStatus.RUNNING)
        crud.request_cancel(session, job_id=ids[1])
        assert requeue_interrupted(db, "re-queued", max_attempts=2) == [ids[0], ids[2]]
        crud.transition(session, job_id=ids[0], status=JobStatus.RUNNING)  # the second attempt
        assert requeue_interrupted(db, "re-queued", max_attempts=2) == []
    with db() as session:
        states = {job_id: crud.get_job(session, job_id=job_id) for job_id in ids}
        assert states[ids[0]].status == "failed" and states[ids[0]].attempts == 2
        assert "stopped 2 times" in states[ids[0]].error["detail"]
        assert states[ids[1]].status == "cancelled"
        assert states[ids[2]].status == "queued"
    engine.dispose()
