"""The package installs like a package: `python -m build` makes a wheel and an sdist, and the
wheel, installed into a fresh venv (no editable install, run from outside the checkout), migrates
its database and serves a workspace until `/readyz` answers 200.

The fresh venv reuses this venv's third-party packages (torch & co.) through a `.pth` line that
adds their site-packages directory, so nothing is downloaded. A directory added by a `.pth` line
has its own `.pth` files ignored, so this checkout's editable install stays invisible there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tarfile
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from app import cli as app_cli
from app.settings import DEMO_WORKSPACE, Settings
from merging_core.errors import ConfigError
from tests.service_helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("app/alembic.ini", "app/migrations/env.py", "app/migrations/script.py.mako",
           "app/demo_workspace/workspace.yaml", "app/demo_workspace/adapters/intent/adapter_model.safetensors")


@pytest.fixture(scope="session")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`python -m build` of this checkout, once per session: the sdist, then the wheel built from it."""
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation: this venv already has the build backend; an isolated build would fetch it.
    done = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def fresh_venv(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new venv with the wheel installed (no dependencies; this venv's packages are visible)."""
    venv = tmp_path_factory.mktemp("fresh") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    (wheel,) = dist.glob("*.whl")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    "--no-index", "--disable-pip-version-check", str(wheel)], check=True, timeout=300)
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "main_venv_packages.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return venv


def _env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "VIRTUAL_ENV") and not key.startswith("LORA_MERGE_")}
    return {**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **extra}


def test_build_makes_a_wheel_and_an_sdist_that_ship_migrations_and_the_demo(dist: Path) -> None:
    (wheel,) = dist.glob("*.whl")
    (sdist,) = dist.glob("*.tar.gz")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert set(SHIPPED) <= names
    assert {n for n in names if n.startswith("app/migrations/versions/") and n.endswith(".py")}
    with tarfile.open(sdist) as archive:
        members = {member.name.split("/", 1)[1]: member for member in archive.getmembers() if "/" in member.name}
    assert set(SHIPPED) <= set(members) and not any(m.issym() for m in members.values())


def test_the_installed_wheel_migrates_and_serves_from_outside_the_checkout(
    fresh_venv: Path, tiny_workspace: Path, tmp_path: Path,
) -> None:
    bin_dir = fresh_venv / "bin"
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    located = subprocess.run(
        [str(bin_dir / "python"), "-c", "import app, merging_core, app.settings as s; "
         "print(app.__file__); print(merging_core.__file__); print(s.Settings().workspace_file())"],
        cwd=cwd, env=_env(), capture_output=True, text=True, timeout=120)
    assert located.returncode == 0, located.stderr
    app_file, core_file, default_workspace = (Path(line) for line in located.stdout.split())
    for path in (app_file, core_file, default_workspace):  # the wheel's copies, not the checkout's
        assert path.is_relative_to(fresh_venv) and not path.is_relative_to(ROOT), path

    artifacts = tmp_path / "artifacts"
    env = _env(LORA_MERGE_WORKSPACE=str(tiny_workspace), LORA_MERGE_ARTIFACTS_DIR=str(artifacts))
    upgrade = subprocess.run([str(bin_dir / "lora-merge"), "db", "upgrade"], cwd=cwd, env=env,
                             capture_output=True, text=True, timeout=120)
    assert upgrade.returncode == 0, upgrade.stderr
    assert "database at head" in upgrade.stdout and (artifacts / "merge_service.db").is_file()

    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as sink:
        server = subprocess.Popen([str(bin_dir / "lora-merge"), "serve", "--port", str(port)], cwd=cwd,
                                  env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        status = None
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            while time.monotonic() < deadline and server.poll() is None:
                try:
                    status = client.get("/readyz").status_code
                except httpx.TransportError:
                    status = None
                if status == 200:
                    break
                time.sleep(0.2)
        assert status == 200, log.read_text()[-3000:]
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


# --- the default workspace is found through the package, or the error says how to choose one ---


def test_the_default_workspace_is_the_demo_shipped_in_the_package() -> None:
    assert DEMO_WORKSPACE.is_file() and Settings(workspace=DEMO_WORKSPACE).workspace_file() == DEMO_WORKSPACE


def test_a_missing_workspace_is_an_error_that_names_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    missing = tmp_path / "gone" / "workspace.yaml"
    monkeypatch.setattr("app.settings.DEMO_WORKSPACE", missing)
    with pytest.raises(ConfigError, match="demo workspace that ships in the package.*LORA_MERGE_WORKSPACE"):
        Settings(workspace=missing).workspace_file()
    monkeypatch.delenv("LORA_MERGE_WORKSPACE", raising=False)
    assert app_cli.main(["serve", "--workspace", str(tmp_path / "other.yaml")]) == 2
    assert "LORA_MERGE_WORKSPACE" in capsys.readouterr().err
