"""Database: SQLAlchemy 2 typed models and the engine (SQLite in WAL mode by default; Postgres
through `postgresql+psycopg://` URLs for a deployment with a database server).

Tables: `jobs`, `sweep_trials`, and `eval_entries` + `eval_task_results`, which mirror every
`eval/index.json` append (the files on disk stay the source of truth; `lora-merge db reindex`
rebuilds the mirror from them).
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    event,
    text,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

# The alembic configuration and `migrations/` ship inside this package (package data in the
# wheel): an installed `lora-merge` migrates from any directory, with no source tree.
ALEMBIC_INI = Path(__file__).resolve().parent / "alembic.ini"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UtcDateTime(TypeDecorator[datetime]):
    """A UTC timestamp that reads back timezone-aware and in UTC.

    SQLite keeps no offset, so values are stored as naive UTC and given `timezone.utc` again on
    the way out (otherwise a job's times would carry a `Z` when created and none once read
    back). Postgres keeps `timestamptz`: a naive value would be read in the session's
    `TimeZone` (hours off on a server that is not on UTC), so it gets an aware UTC value, and
    what it returns (in the session's zone) is converted back to UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        aware = value.astimezone(timezone.utc) if value.tzinfo else value.replace(tzinfo=timezone.utc)
        return aware if dialect.name == "postgresql" else aware.replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.astimezone(timezone.utc) if value.tzinfo else value.replace(tzinfo=timezone.utc)


class JobKind(str, Enum):
    MERGE = "merge"
    EVALUATE = "evaluate"
    SWEEP = "sweep"


class JobStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}
ALLOWED_TRANSITIONS = {
    JobStatus.QUEUED: {JobStatus.RUNNING, JobStatus.CANCELLED},
    JobStatus.RUNNING: {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.QUEUED},
}


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), index=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    request: Mapped[dict[str, Any]] = mapped_column(JSON)
    request_hash: Mapped[str] = mapped_column(String(64))
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True, nullable=True)
    progress_done: Mapped[int] = mapped_column(Integer, default=0)
    progress_total: Mapped[int] = mapped_column(Integer, default=0)
    progress_message: Mapped[str] = mapped_column(String(500), default="")
    progress_best: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    run_dir: Mapped[str | None] = mapped_column(String(1000), nullable=True)
    sweep_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class SweepTrial(Base):
    __tablename__ = "sweep_trials"
    __table_args__ = (UniqueConstraint("sweep_id", "trial_index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    sweep_id: Mapped[str] = mapped_column(String(64), index=True)
    trial_index: Mapped[int] = mapped_column(Integer)
    point: Mapped[dict[str, Any]] = mapped_column(JSON)
    source: Mapped[str] = mapped_column(String(32))
    objective: Mapped[float] = mapped_column(Float)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    interference_delta: Mapped[dict[str, Any]] = mapped_column(JSON)
    merge_tag: Mapped[str] = mapped_column(String(200))
    fidelity: Mapped[int | None] = mapped_column(Integer, nullable=True)  # eval subset size
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class EvalEntry(Base):
    """One `eval/index.json` entry."""

    __tablename__ = "eval_entries"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    index_path: Mapped[str] = mapped_column(String(1000))
    method: Mapped[str] = mapped_column(String(64), index=True)
    merge_tag: Mapped[str] = mapped_column(String(200), index=True)
    adapters: Mapped[list[str]] = mapped_column(JSON)
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    split: Mapped[str] = mapped_column(String(64), index=True)
    subset: Mapped[str | None] = mapped_column(String(200), nullable=True, index=True)
    objective_min_delta: Mapped[float] = mapped_column(Float)
    run_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    sweep_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[str] = mapped_column(String(64))
    entry: Mapped[dict[str, Any]] = mapped_column(JSON)


class EvalTaskResult(Base):
    """Per-task metric of an eval entry, for filtering and sorting by task."""

    __tablename__ = "eval_task_results"

    entry_id: Mapped[str] = mapped_column(ForeignKey("eval_entries.id", ondelete="CASCADE"),
                                          primary_key=True)
    task: Mapped[str] = mapped_column(String(200), primary_key=True, index=True)
    metric: Mapped[float] = mapped_column(Float)
    interference_delta: Mapped[float] = mapped_column(Float)


SQLITE_BEGIN = "sqlite_begin"  # execution option: IMMEDIATE (default) or DEFERRED


def make_engine(url: str) -> Engine:
    """An engine; SQLite gets WAL, a busy timeout and `BEGIN IMMEDIATE` write transactions.
    Postgres runs at its default READ COMMITTED; the steps that must not interleave (an
    Idempotency-Key's first use, the queue limit's count-and-insert) take advisory locks."""
    is_sqlite = url.startswith("sqlite")
    engine = create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": 30} if is_sqlite else {},
        # A database server restarts or drops idle connections; check one before handing it out.
        pool_pre_ping=not is_sqlite,
    )
    if is_sqlite:

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection, connection_record):  # type: ignore[no-untyped-def]
            # Let SQLAlchemy issue BEGIN itself (IMMEDIATE below), not the sqlite3 module.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            # In WAL mode NORMAL never corrupts the database; a power cut may lose the last
            # commits, which the files on disk (the source of truth) still hold. FULL's fsync
            # on every commit made each trial's progress and mirror writes cost milliseconds.
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(connection):  # type: ignore[no-untyped-def]
            # Writers take the write lock up front (no deadlock-prone read-then-upgrade);
            # readers (sessions from make_session_factory(read_only=True)) begin deferred, so under WAL they never wait for it.
            mode = connection.get_execution_options().get(SQLITE_BEGIN, "IMMEDIATE")
            connection.exec_driver_sql(f"BEGIN {mode}")

    return engine


# Namespaces (the first key) of the service's Postgres advisory locks.
QUEUE_LOCK = 0x4C4D0001  # count-and-insert of a job: the queue limit
IDEMPOTENCY_LOCK = 0x4C4D0002  # one Idempotency-Key (second key: a hash of it)


def is_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def advisory_xact_lock(session: Session, namespace: int, name: str = "") -> None:
    """On Postgres, wait for and take an advisory lock on (`namespace`, `name`) that holds until
    the session's transaction ends; elsewhere nothing (SQLite writers already hold the one write
    lock from `BEGIN IMMEDIATE`)."""
    if not is_postgres(session):
        return
    digest = hashlib.blake2b(name.encode(), digest_size=4).digest()
    session.execute(text("SELECT pg_advisory_xact_lock(:namespace, :key)"),
                    {"namespace": namespace, "key": int.from_bytes(digest, "big", signed=True)})


def make_session_factory(engine: Engine, *, read_only: bool = False) -> sessionmaker:
    """Sessions for writes, or (`read_only`) for reads that never take SQLite's write lock."""
    bind = engine.execution_options(**{SQLITE_BEGIN: "DEFERRED"}) if read_only else engine
    return sessionmaker(bind, expire_on_commit=False)


def alembic_config(url: str | None = None) -> Config:
    """The package's alembic configuration; `url` (else the settings' database) is migrated."""
    config = Config(str(ALEMBIC_INI))
    if url is not None:
        config.attributes["url"] = url
    return config


def upgrade_database(url: str) -> None:
    """`alembic upgrade head` on the given database."""
    command.upgrade(alembic_config(url), "head")
