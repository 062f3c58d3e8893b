"""The service on a real Postgres server (Debian's `postgresql`, started for this module): the
migrations, a job through the service, the idempotency race, the queue limit under concurrency,
UTC timestamps on a server whose `TimeZone` is not UTC, and a grid sweep (its trials and the
eval index mirror in Postgres match the files on disk)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.script import ScriptDirectory

from app import crud
from app.db import Job, JobKind, alembic_config, make_engine, make_session_factory, upgrade_database
from app.settings import Settings
from merging_core.runtime.index import read_index
from tests.postgres_helpers import SERVER_TIMEZONE, PostgresServer, postgres_server
from tests.service_helpers import thread_server, wait_job

MERGE = {"adapters": ["topic", "mood"], "method": "ties"}
SWEEP = {"adapters": ["topic", "mood"], "method": "weighted_delta",
         "search": {"type": "grid", "grid": {"lambda": [0.0, 0.5, 1.0]}}}


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


@pytest.fixture
def database_url(postgres: PostgresServer) -> str:
    """A fresh database (at head) for one test."""
    url = postgres.create_database(f"t_{uuid.uuid4().hex[:12]}")
    upgrade_database(url)
    return url


def _run_together(count: int, work: Callable[[int], Any]) -> list[Any]:
    """`work(i)` in `count` threads released at the same moment."""
    barrier = threading.Barrier(count)

    def run(index: int) -> Any:
        barrier.wait()
        return work(index)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(run, range(count)))


def test_migrations_reach_head_on_postgres(postgres: PostgresServer) -> None:
    url = postgres.create_database("migrations")
    # The usual spelling of the URL works too (settings map it to the psycopg 3 driver).
    upgrade_database(Settings(database_url=url.replace("postgresql+psycopg://", "postgresql://"))
                     .resolved_database_url)
    upgrade_database(url)  # at head already: a no-op
    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            assert connection.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all() == [head]
            inspector = sa.inspect(connection)
            assert {"jobs", "sweep_trials", "eval_entries", "eval_task_results"} <= set(inspector.get_table_names())
            columns = {column["name"]: column for column in inspector.get_columns("jobs")}
            assert columns["created_at"]["type"].timezone  # timestamptz: the instant, not a wall time
            trials = {column["name"] for column in inspector.get_columns("sweep_trials")}
            assert {"fidelity", "worker"} <= trials  # 0002 applied
    finally:
        engine.dispose()


def test_service_on_postgres_runs_a_merge_lists_it_and_keeps_utc(
    tiny_workspace: Path, tmp_path: Path, database_url: str,
) -> None:
    settings = Settings(workspace=tiny_workspace, artifacts_dir=tmp_path / "artifacts",
                        database_url=database_url)
    with thread_server(settings) as (client, _):
        answer = client.post("/merges", json={**MERGE, "eval_tasks": ["topic", "mood"]})
        assert answer.status_code == 202, answer.text
        job = wait_job(client, answer.json()["id"])
        assert job["status"] == "succeeded", job
        listed = client.get("/jobs").json()["jobs"]
        assert [j["id"] for j in listed] == [job["id"]]
        # Paging (the token compares timestamps in the database) continues after the job.
        page = client.get("/jobs", params={"limit": 1}).json()
        assert [j["id"] for j in page["jobs"]] == [job["id"]] and page.get("next_page_token") is None

    # The server (and so every session) runs on another zone; the API still answers in UTC ...
    stamps = job["timestamps"]
    assert all(value.endswith("Z") for value in stamps.values()), stamps
    created = datetime.fromisoformat(stamps["created_at"])
    assert abs((datetime.now(timezone.utc) - created).total_seconds()) < 300
    assert answer.json()["timestamps"]["created_at"] == stamps["created_at"]
    # ... and the stored instants are the ones the API reports, not shifted by the zone.
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as connection:
            assert connection.execute(sa.text("SHOW TimeZone")).scalar() == SERVER_TIMEZONE
            stored = connection.execute(sa.text(
                "SELECT created_at, started_at, finished_at, updated_at FROM jobs WHERE id = :id"),
                {"id": job["id"]}).one()
    finally:
        engine.dispose()
    for name, value in zip(("created_at", "started_at", "finished_at", "updated_at"), stored):
        assert value.utcoffset() != timedelta(0)  # read back in the server's zone
        assert value == datetime.fromisoformat(stamps[name]), (name, value, stamps[name])


def test_timestamps_stay_utc_in_a_session_on_another_zone(database_url: str) -> None:
    engine = make_engine(database_url)

    @sa.event.listens_for(engine, "connect")
    def _zone(dbapi_connection, _record):  # type: ignore[no-untyped-def]
        with dbapi_connection.cursor() as cursor:
            cursor.execute("SET TIME ZONE 'Asia/Kolkata'")  # +05:30, unlike the server's zone
        dbapi_connection.commit()

    try:
        db = make_session_factory(engine)
        with db() as session:
            older, newer = (crud.create_job(session, kind=JobKind.MERGE, request=MERGE,
                                            request_hash="h", idempotency_key=None)[0] for _ in range(2))
        with db() as session:
            assert session.execute(sa.text("SHOW TimeZone")).scalar() == "Asia/Kolkata"
            read = crud.get_job(session, job_id=older.id).created_at
            # A page token (microseconds since the epoch, UTC) compares right in this zone.
            first, token = crud.list_jobs(session, kind=None, status=None, limit=1, page_token=None)
            second, _ = crud.list_jobs(session, kind=None, status=None, limit=1, page_token=token)
    finally:
        engine.dispose()
    assert read == older.created_at and read.utcoffset() == timedelta(0)
    assert [first[0].id, second[0].id] == [newer.id, older.id]


def test_idempotency_race_through_the_service(
    tiny_workspace: Path, tmp_path: Path, database_url: str,
) -> None:
    settings = Settings(workspace=tiny_workspace, artifacts_dir=tmp_path / "artifacts",
                        database_url=database_url)
    with thread_server(settings) as (client, _):
        for attempt in range(3):  # three rounds: more chances for the two to meet
            key = f"race-{attempt}"
            answers = _run_together(2, lambda _: client.post(
                "/merges", json=MERGE, headers={"Idempotency-Key": key}))
            assert [a.status_code for a in answers] == [202, 202], [a.text for a in answers]
            assert len({a.json()["id"] for a in answers}) == 1
            assert sorted("idempotent-replayed" in a.headers for a in answers) == [False, True]
        jobs = client.get("/jobs").json()["jobs"]
        assert len(jobs) == 3
        for job in jobs:
            assert wait_job(client, job["id"])["status"] == "succeeded"


def test_idempotency_race_in_the_data_layer(database_url: str) -> None:
    """Both look the key up, then both insert, with time between for the other to insert first:
    the key's lock makes the second wait, find the first's job and insert nothing."""
    engine = make_engine(database_url)
    db = make_session_factory(engine)

    def first_use(_: int) -> tuple[str, bool]:
        with db() as session:
            existing = crud.find_job_by_idempotency_key(session, key="k")
            if existing is not None:
                return existing.id, False
            time.sleep(0.3)
            job, created = crud.create_job(session, kind=JobKind.MERGE, request=MERGE, request_hash="h",
                                           idempotency_key="k")
            return job.id, created

    try:
        results = _run_together(4, first_use)
        assert len({job_id for job_id, _ in results}) == 1
        assert sorted(created for _, created in results) == [False, False, False, True]
        # An insert that skipped the look-up meets the unique constraint: rolled back, and the
        # key's one job comes back instead (never a 500 or a second job).
        with db() as session:
            job, created = crud.create_job(session, kind=JobKind.MERGE, request=MERGE, request_hash="h",
                                           idempotency_key="k")
            assert (job.id, created) == (results[0][0], False)
            assert session.scalar(sa.select(sa.func.count()).select_from(Job)) == 1
    finally:
        engine.dispose()


def test_queue_limit_in_the_data_layer(database_url: str) -> None:
    """Count, wait, insert, in 6 threads at once with room for 2: the lock around count-and-insert
    lets exactly 2 in (without it all 6 would count 0 and insert)."""
    engine = make_engine(database_url)
    db = make_session_factory(engine)
    limit = 2

    def submit(_: int) -> bool:
        with db() as session:
            if crud.count_queued(session) >= limit:
                return False
            time.sleep(0.2)
            crud.create_job(session, kind=JobKind.MERGE, request=MERGE, request_hash="h",
                            idempotency_key=None)
            return True

    try:
        assert sorted(_run_together(6, submit)) == [False] * 4 + [True] * 2
        with db() as session:
            assert crud.count_queued(session) == limit
    finally:
        engine.dispose()


def test_queue_limit_through_the_service(
    tiny_workspace: Path, tmp_path: Path, database_url: str,
) -> None:
    settings = Settings(workspace=tiny_workspace, artifacts_dir=tmp_path / "artifacts",
                        database_url=database_url, max_queued_jobs=2)
    with thread_server(settings) as (client, app):
        with app.state.service.executor.paused():  # the worker takes no job: the queue fills
            answers = _run_together(6, lambda _: client.post("/merges", json=MERGE))
            assert sorted(a.status_code for a in answers) == [202] * 2 + [429] * 4, [a.text for a in answers]
            assert len(client.get("/jobs", params={"status": "queued"}).json()["jobs"]) == 2
        for answer in answers:
            if answer.status_code == 202:
                assert wait_job(client, answer.json()["id"])["status"] == "succeeded"


def test_grid_sweep_on_postgres_matches_its_files(
    tiny_workspace: Path, tmp_path: Path, database_url: str,
) -> None:
    artifacts = tmp_path / "artifacts"
    settings = Settings(workspace=tiny_workspace, artifacts_dir=artifacts, database_url=database_url)
    with thread_server(settings) as (client, _):
        answer = client.post("/sweeps", json=SWEEP)
        assert answer.status_code == 202, answer.text
        job = wait_job(client, answer.json()["id"])
        assert job["status"] == "succeeded", job
        page = client.get(f"/sweeps/{job['id']}/trials").json()
    sweep_id = job["result"]["sweep_id"]
    assert page["sweep_id"] == sweep_id and job["result"]["num_trials"] == 3
    assert [t["index"] for t in page["trials"]] == [0, 1, 2]  # each trial once, in order
    assert [t["point"] for t in page["trials"]] == [{"lambda": v} for v in (0.0, 0.5, 1.0)]

    combo = artifacts / "merged" / "weighted_delta" / "mood_topic"
    files = {int(path.stem.split("_")[1]): json.loads(path.read_text())
             for path in (combo / "sweeps" / sweep_id / "trials").glob("trial_*.json")}
    assert sorted(files) == [0, 1, 2]
    index = read_index(combo / "eval" / "index.json")

    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(sa.text(
                "SELECT trial_index, job_id, point, objective, metrics, merge_tag, fidelity, created_at "
                "FROM sweep_trials WHERE sweep_id = :sweep ORDER BY trial_index"),
                {"sweep": sweep_id}).mappings().all()
            assert connection.execute(sa.text("SELECT count(*) FROM sweep_trials")).scalar() == 3
            entries = connection.execute(sa.text(
                "SELECT id, sweep_id, objective_min_delta, entry FROM eval_entries ORDER BY id")).mappings().all()
            stored = connection.execute(sa.text(
                "SELECT created_at, started_at, finished_at, updated_at FROM jobs WHERE id = :id"),
                {"id": job["id"]}).one()
    finally:
        engine.dispose()

    # The trials in Postgres are the ones on disk (and the ones the API listed).
    assert [row["trial_index"] for row in rows] == [0, 1, 2]
    for row in rows:
        on_disk = files[row["trial_index"]]
        assert row["job_id"] == job["id"]
        assert (row["point"], row["objective"], row["metrics"], row["merge_tag"], row["fidelity"]) == (
            on_disk["point"], on_disk["objective"], on_disk["metrics"], on_disk["merge_tag"],
            on_disk["fidelity"]), row["trial_index"]
        assert page["trials"][row["trial_index"]]["objective"] == on_disk["objective"]
    # The mirror holds exactly one row per index entry, with the same ids and content.
    assert len(index) == 3 and len({e["id"] for e in index}) == 3
    assert [e["id"] for e in entries] == sorted(e["id"] for e in index) == [
        f"{sweep_id}/trial_{i:04d}" for i in range(3)]
    by_id = {e["id"]: e for e in index}
    for entry in entries:
        assert entry["sweep_id"] == sweep_id
        assert entry["objective_min_delta"] == by_id[entry["id"]]["objective_min_delta"]
        assert json.dumps(entry["entry"], sort_keys=True) == json.dumps(by_id[entry["id"]], sort_keys=True)
    # Timestamps: UTC in the API; the stored instants (read back in the server's zone, so
    # timezone-aware and not UTC) are the same instants, and each trial lies within the run.
    stamps = job["timestamps"]
    assert all(value.endswith("Z") for value in stamps.values()), stamps
    assert answer.json()["timestamps"]["created_at"] == stamps["created_at"]
    for name, value in zip(("created_at", "started_at", "finished_at", "updated_at"), stored):
        assert value.tzinfo is not None and value.utcoffset() != timedelta(0), (name, value)
        assert value == datetime.fromisoformat(stamps[name]), (name, value, stamps[name])
    started, finished = (datetime.fromisoformat(stamps[k]) for k in ("started_at", "finished_at"))
    for row in rows:
        assert row["created_at"].tzinfo is not None and started <= row["created_at"] <= finished
