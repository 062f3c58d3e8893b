"""A throwaway Postgres server from Debian's `postgresql` package, for the tests.

`initdb` refuses to run as root (and CI runs as root), so as root the server is initialised and
run as the `postgres` user, in a temporary directory that user owns, with its socket there (`-k`)
and on a free loopback port. The server's `TimeZone` is not UTC on purpose: the service must keep
its timestamps in UTC whatever the server's zone.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.service_helpers import free_port

SERVER_TIMEZONE = "America/Los_Angeles"
INSTALL_HINT = ("Postgres server binaries (Debian's `postgresql` package) not found under "
                "/usr/lib/postgresql/*/bin; run `make test`, which installs them "
                "(or `apt-get install -y postgresql`)")


@dataclass(frozen=True)
class PostgresServer:
    host: str
    port: int
    user: str

    def url(self, database: str) -> str:
        """The SQLAlchemy URL (psycopg 3 driver) of one database on this server."""
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new, empty database; returns its URL."""
        import psycopg

        with psycopg.connect(host=self.host, port=self.port, user=self.user, dbname="postgres",
                             autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def postgres_bin_dir() -> Path:
    """The newest installed server's bin directory; fails the test (not a skip) without one."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda path: int(Path(path).parent.parent.name))
    if not found:
        pytest.fail(INSTALL_HINT)
    return Path(found[-1]).parent


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """Start a fresh cluster, yield it, then stop it and delete its files."""
    bin_dir = postgres_bin_dir()
    as_root = os.geteuid() == 0
    run_as = ["runuser", "-u", "postgres", "--"] if as_root else []
    # Not under pytest's tmp directory: its parents are private to root, and the server runs as
    # `postgres`.
    root = Path(tempfile.mkdtemp(prefix="lora-merge-pg-"))
    data, log = root / "data", root / "server.log"
    if as_root:
        shutil.chown(root, "postgres", "postgres")
    port = free_port()
    user = "postgres" if as_root else os.environ.get("USER", "postgres")

    def run(*args: str) -> None:
        completed = subprocess.run([*run_as, *args], capture_output=True, text=True, timeout=120)
        if completed.returncode != 0:
            server_log = log.read_text() if log.is_file() else ""
            raise RuntimeError(f"{' '.join(args[:2])} failed ({completed.returncode}):\n"
                               f"{completed.stdout}{completed.stderr}{server_log}")

    try:
        run(str(bin_dir / "initdb"), "-D", str(data), "-U", user, "--auth=trust", "-E", "UTF8",
            "--no-sync")
        # fsync off: a test database need not survive a power cut, and commits stay fast.
        options = (f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off "
                   f"-c synchronous_commit=off -c TimeZone={SERVER_TIMEZONE}")
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w",
            "-t", "60", "start")
        try:
            yield PostgresServer(host="127.0.0.1", port=port, user=user)
        finally:
            run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)
