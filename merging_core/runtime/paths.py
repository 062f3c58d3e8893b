"""The seed's artifact layout.

    <root>/merged/<method>/<task_combo>/runs/run_YYYYMMDD_HHMMSS/
    <root>/merged/<method>/<task_combo>/eval/<split>/eval_results_<merge_tag>_<split>.json
    <root>/merged/<method>/<task_combo>/eval/index.json
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from merging_core.errors import ArtifactError

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_component(text: str) -> str:
    cleaned = _UNSAFE.sub("-", text).strip(".-")
    return cleaned or "x"


def task_combo(adapter_names: Sequence[str]) -> str:
    """`<task_combo>`: the adapter names, sorted, joined by `_` (the seed's `asr_intent`)."""
    return "_".join(safe_component(n) for n in sorted(adapter_names))


def merged_dir(root: Path, method: str, adapter_names: Sequence[str]) -> Path:
    return Path(root) / "merged" / safe_component(method) / task_combo(adapter_names)


def merge_tag(method: str, params: dict[str, Any], extra: dict[str, Any] | None = None) -> str:
    """A readable, filename-safe tag for one merge configuration, unique by a short hash."""
    parts = [method]
    for key in sorted(params):
        value = params[key]
        if isinstance(value, float):
            value = f"{value:g}"
        elif isinstance(value, list):
            value = "-".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
        parts.append(f"{key}{value}")
    readable = safe_component("_".join(parts))[:80]
    canonical = json.dumps({"params": params, "extra": extra or {}}, sort_keys=True, default=str)
    digest = hashlib.sha1(canonical.encode()).hexdigest()[:8]
    return f"{readable}_{digest}"


def make_temp_run_dir(runs_root: Path) -> Path:
    """A private, hidden directory to build a run bundle in (see `publish_run_dir`)."""
    runs_root = Path(runs_root)
    try:
        runs_root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".tmp_run_", dir=runs_root))
    except OSError as exc:
        raise ArtifactError(f"cannot create a run directory under {runs_root}: {exc}") from exc


def claim_run_dir(runs_root: Path, now: datetime | None = None) -> Path:
    """Claim `runs/run_YYYYMMDD_HHMMSS` with an exclusive mkdir (an empty placeholder).

    Two runs in the same second get `_1`, `_2`, ... suffixes, so they never collide.
    """
    stamp = (now or datetime.now(timezone.utc)).strftime("run_%Y%m%d_%H%M%S")
    for suffix in range(1000):
        final = Path(runs_root) / (stamp if suffix == 0 else f"{stamp}_{suffix}")
        try:
            final.mkdir()
        except FileExistsError:
            continue
        return final
    raise ArtifactError(f"too many runs in one second under {runs_root}")


def publish_run_dir(temp: Path, final: Path) -> None:
    """Atomically rename the finished bundle over its (empty) claimed placeholder."""
    temp.replace(final)


def discard_run_dir(temp: Path, final: Path | None = None) -> None:
    shutil.rmtree(temp, ignore_errors=True)
    if final is not None:
        shutil.rmtree(final, ignore_errors=True)
