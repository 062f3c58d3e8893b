"""docker/compose.yaml: the `cpu`/`cuda` services and the Ray cluster profile (issue 16).

No container runs here (and none with a GPU could): the static tests parse the file with PyYAML
and always run; the compose tests run `<compose> -f docker/compose.yaml [--profile ray] config`
where a compose implementation exists (`docker compose` or `docker-compose`; config needs no
daemon) and skip otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker" / "compose.yaml"

RAY_SERVICES = ("postgres", "ray-head", "ray-worker-gpu", "api")
RAY_NODES = ("ray-head", "ray-worker-gpu", "api")
API_ENV = {
    "LORA_MERGE_EXECUTOR": "ray",
    "LORA_MERGE_RAY_ADDRESS": "ray-head:6379",
    "LORA_MERGE_DATABASE_URL": "postgresql+psycopg://lora:lora@postgres:5432/lora",
    "LORA_MERGE_RAY_GPUS_PER_WORKER": "1",
}


# --- helpers shared by the static and the compose tests -----------------------------------------


def _env(service: dict) -> dict[str, str | None]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # ["KEY=value", "KEY"]
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {k: (None if v is None else str(v)) for k, v in env.items()}


def _mounts(service: dict) -> dict[str, str]:
    """target -> source of a service's volumes, short ("src:dst[:mode]") or long syntax."""
    out = {}
    for vol in service.get("volumes") or []:
        if isinstance(vol, dict):
            out[vol["target"]] = str(vol.get("source"))
        else:
            # `${VAR:-default}` holds a colon of its own: split on the others.
            parts = re.sub(
                r"\$\{[^}]*\}", lambda m: m.group(0).replace(":", "\0"), vol
            ).split(":")
            parts = [p.replace("\0", ":") for p in parts]
            if len(parts) == 1:  # anonymous volume
                out[parts[0]] = ""
            else:
                out[parts[1]] = parts[0]
    return out


def _command(service: dict) -> str:
    cmd = service.get("command") or []
    return " ".join(cmd) if isinstance(cmd, list) else str(cmd)


def _gpu_reserved(service: dict) -> bool:
    devices = (
        service.get("deploy", {})
        .get("resources", {})
        .get("reservations", {})
        .get("devices", [])
    )
    return any(
        d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])
        for d in devices
    )


def _check_ray_cluster(services: dict) -> None:
    for name in RAY_SERVICES:
        assert name in services, f"service {name} missing: {sorted(services)}"
        assert services[name].get("profiles") == ["ray"], (
            name,
            services[name].get("profiles"),
        )

    pg = services["postgres"]
    assert str(pg["image"]).startswith("postgres:16"), pg["image"]
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert "/var/lib/postgresql/data" in _mounts(pg)

    # One image on every Ray node (same Python, same Ray version).
    images = {services[name]["image"] for name in RAY_NODES}
    assert images == {"lora-merge:cuda"}, images

    head = _command(services["ray-head"])
    for flag in (
        "ray start",
        "--head",
        "--port=6379",
        "--num-cpus=0",
        "--dashboard-host=0.0.0.0",
        "--disable-usage-stats",
        "--block",
    ):
        assert flag in head, (flag, head)
    assert not _gpu_reserved(services["ray-head"])

    worker = services["ray-worker-gpu"]
    for flag in ("ray start", "--address=ray-head:6379", "--num-gpus=1", "--block"):
        assert flag in _command(worker), (flag, _command(worker))
    assert _gpu_reserved(worker)
    assert "ray-head" in worker["depends_on"]

    api = services["api"]
    env = _env(api)
    for key, value in API_ENV.items():
        assert env.get(key) == value, (key, env.get(key))
    cmd = _command(api)
    assert "lora-merge serve --host 0.0.0.0" in cmd, cmd
    # The driver needs a local raylet: the API joins as a node that takes no actors.
    assert "ray start --address=ray-head:6379 --num-cpus=0 --num-gpus=0" in cmd, cmd
    assert {"postgres", "ray-head"} <= set(api["depends_on"])
    assert any(str(p).endswith(":8000") or "8000" in str(p) for p in api["ports"])

    # The same volumes at the same absolute paths on every Ray node.
    mounts = {name: _mounts(services[name]) for name in RAY_NODES}
    assert mounts["api"] == mounts["ray-head"] == mounts["ray-worker-gpu"], mounts
    assert {"/data/artifacts", "/models"} <= set(mounts["api"]), mounts["api"]


def _check_single_services(services: dict) -> None:
    """`cpu` as before; `cuda` too where listed (compose v2 leaves out services whose profile is
    not active, v1 lists them all)."""
    cpu = services["cpu"]
    assert cpu["image"] == "lora-merge:cpu" and not cpu.get("profiles")
    assert not _gpu_reserved(cpu)
    checked = [cpu]
    if "cuda" in services:
        cuda = services["cuda"]
        assert cuda["image"] == "lora-merge:cuda" and cuda.get("profiles") == ["gpu"]
        assert _gpu_reserved(cuda)
        checked.append(cuda)
    for svc in checked:
        assert _mounts(svc)["/data/artifacts"] == "artifacts"
        assert "/models" in _mounts(svc)


# --- static: no docker needed ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose_file() -> dict:
    return yaml.safe_load(
        COMPOSE_FILE.read_text()
    )  # SafeLoader resolves the `<<` merge keys


def test_compose_file_ray_profile(compose_file):
    services = compose_file["services"]
    _check_ray_cluster(services)
    for name in RAY_SERVICES:
        for mount in services[name].get("volumes") or []:
            source = mount.split(":")[0]
            if not source.startswith(("$", ".", "/")):  # a named volume
                assert source in compose_file["volumes"], (
                    f"named volume {source} not declared"
                )


def test_compose_file_single_services_unchanged(compose_file):
    assert "cuda" in compose_file["services"]
    _check_single_services(compose_file["services"])


def test_images_have_ray_on_path():
    """`ray start` must resolve in both images: pip installs the wheel's dependencies (ray among
    them) into the Python whose bin directory is on PATH."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "dependencies"
    ]
    assert any(
        d.replace(" ", "").lower().startswith(("ray>", "ray=", "ray[", "ray<"))
        for d in deps
    ), (
        "pyproject.toml must depend on ray: the compose Ray nodes run `ray start` from the image"
    )
    cpu = (ROOT / "docker" / "Dockerfile").read_text()
    assert (
        "FROM python:3.11-slim" in cpu
    )  # pip installs console scripts into /usr/local/bin
    cuda = (ROOT / "docker" / "Dockerfile.cuda").read_text()
    assert (
        "python3 -m venv /opt/venv" in cuda and "ENV PATH=/opt/venv/bin:$PATH" in cuda
    )


# --- with a compose implementation ----------------------------------------------------------------


def _compose() -> list[str] | None:
    if shutil.which("docker"):
        try:
            if (
                subprocess.run(
                    ["docker", "compose", "version"],
                    capture_output=True,
                    timeout=60,
                    check=False,
                ).returncode
                == 0
            ):
                return ["docker", "compose"]
        except (OSError, subprocess.TimeoutExpired):
            pass
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def _config(*profile: str) -> dict:
    compose = _compose()
    if compose is None:
        pytest.skip(
            "no compose implementation: neither `docker compose` nor `docker-compose` is installed "
            "(Debian: apt-get install docker-compose)"
        )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORA_MERGE_")}
    base = [*compose, "-f", str(COMPOSE_FILE), *profile, "config"]
    # Compose v2 prints JSON on request; v1 (docker-compose 1.x) knows no --format (it prints its
    # usage, even with exit status 0): then parse its YAML.
    res = subprocess.run(
        [*base, "--format", "json"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=120,
    )
    if res.returncode == 0:
        try:
            return json.loads(res.stdout)
        except json.JSONDecodeError:
            pass
    res = subprocess.run(
        base, capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert res.returncode == 0, f"{' '.join(base)} failed:\n{res.stderr}"
    return yaml.safe_load(res.stdout)


def test_compose_config_plain():
    services = _config()["services"]
    _check_single_services(services)


def test_compose_config_ray_profile():
    services = _config("--profile", "ray")["services"]
    _check_ray_cluster(services)
    _check_single_services(services)
