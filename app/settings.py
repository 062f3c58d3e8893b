"""Service settings, read from the environment (prefix `LORA_MERGE_`) or a `.env` file."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from merging_core.errors import ConfigError

WORKSPACE_ENV = "LORA_MERGE_WORKSPACE"
# The demo workspace ships inside the package (package data of `app`; in a checkout
# `app/demo_workspace` links to `workspaces/demo`), so the default is found the same way from a
# checkout, an installed wheel or an image, whatever the working directory.
DEMO_WORKSPACE = (Path(__file__).resolve().parent / "demo_workspace" / "workspace.yaml").resolve()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORA_MERGE_", env_file=".env", extra="ignore")

    workspace: Path = Field(default=DEMO_WORKSPACE, description="workspace YAML (default: the built-in demo)")
    artifacts_dir: Path = Field(default=Path("artifacts"), description="artifacts root")
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL (default sqlite:///<artifacts>/merge_service.db); Postgres: "
        "postgresql+psycopg://user:password@host:5432/dbname",
    )
    device: str | None = Field(default=None, description="override the workspace device")
    dtype: str | None = Field(default=None, description="override the workspace dtype")
    host: str = "127.0.0.1"
    port: int = 8000
    token: SecretStr | None = Field(default=None, description="bearer token; unset = no auth")
    allowed_adapter_roots: list[Path] = Field(
        default_factory=list,
        description="directories adapter paths may point into (the workspace and artifacts "
        "directories are always allowed)",
    )
    worker_threads: int | None = Field(
        default=None, ge=1,
        description="torch threads of the worker process (default: the cores less one, at least 1, "
        "so the API always has a core); with executor ray, of each actor, and the CPUs it "
        "takes (default 1)",
    )
    api_threads: int = Field(
        default=40, ge=1, description="threads that run the API's sync routes (AnyIO's pool)")
    executor: Literal["embedded", "ray"] = Field(
        default="embedded",
        description="embedded: one worker process beside the API holds the model; ray: model "
        "actors on a Ray cluster compute, this process writes (see the README's Scale out)",
    )
    ray_address: str = Field(
        default="local",
        description="Ray to use with executor ray: local (start one on this machine), auto (the "
        "cluster this machine has joined), host:port or ray://host:port",
    )
    ray_workers: int | None = Field(
        default=None, ge=1, description="model actors (default: one per GPU in the cluster, else 1)")
    ray_gpus_per_worker: float | None = Field(
        default=None, ge=0, description="GPUs each actor takes (default: 1 where the cluster has GPUs, else 0)")
    max_queued_jobs: int = Field(default=100, ge=1)
    max_attempts: int = Field(
        default=3, ge=1, description="runs of one job before a worker death fails it instead of re-queuing")
    max_body_bytes: int = Field(default=1_000_000, ge=1024)

    @field_validator("database_url")
    @classmethod
    def _postgres_driver(cls, url: str | None) -> str | None:
        """`postgresql://` and `postgres://` (the usual spellings) use psycopg 3, the driver the
        package depends on; SQLAlchemy's own default for them is psycopg2, which it lacks."""
        if url is not None:
            for scheme in ("postgresql://", "postgres://"):
                if url.startswith(scheme):
                    return "postgresql+psycopg://" + url[len(scheme):]
        return url

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.artifacts_dir / 'merge_service.db').resolve()}"

    def workspace_file(self) -> Path:
        """The workspace file, checked to exist; the error says how to choose one."""
        if not self.workspace.is_file():
            what = ("the demo workspace that ships in the package" if self.workspace == DEMO_WORKSPACE
                    else "workspace file")
            raise ConfigError(f"{what} not found: {self.workspace}; set {WORKSPACE_ENV} (or pass "
                              "--workspace) to a workspace file")
        return self.workspace

    def adapter_roots(self) -> list[Path]:
        roots = [self.workspace.resolve().parent, self.artifacts_dir.resolve()]
        return roots + [root.resolve() for root in self.allowed_adapter_roots]


@lru_cache
def get_settings() -> Settings:
    return Settings()
