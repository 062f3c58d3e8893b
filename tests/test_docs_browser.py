"""Swagger UI and ReDoc render in a headless Chromium with no network (assets served locally)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from app.settings import Settings
from tests.service_helpers import thread_server

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run",
                  "--disable-quic", "--virtual-time-budget=15000",
                  # no network but the service: every other host name fails to resolve, so a
                  # page that needed a CDN would render blank here
                  "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]


def _dom(url: str, profile: Path) -> str:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is required (make test installs it)"
    result = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
        capture_output=True, text=True, timeout=120,
    )
    return result.stdout


def test_docs_render_offline(tiny_workspace: Path, tmp_path: Path) -> None:
    settings = Settings(workspace=tiny_workspace, artifacts_dir=tmp_path / "artifacts")
    with thread_server(settings) as (client, _):
        base = str(client.base_url).rstrip("/")
        html = client.get("/docs").text
        assert "cdn" not in html.lower()
        swagger = _dom(f"{base}/docs", tmp_path / "profile-docs")
        assert "opblock" in swagger, swagger[:2000]
        for operation in ("/merges", "/sweeps", "/jobs/{job_id}", "/methods"):
            assert operation in swagger
        assert "LoRA Merge Service" in swagger
        redoc = _dom(f"{base}/redoc", tmp_path / "profile-redoc")
        assert "create_merge" in redoc or "Queue a merge" in redoc
