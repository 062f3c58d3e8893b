"""The append-only eval index (`eval/index.json`): a JSON list of every evaluation.

Appends happen under a file lock and replace the file atomically (temp + fsync + rename), so
concurrent writers lose no entry and a crashing writer leaves the previous index intact.
Entries carry an `id`; appending an id that is already there is a no-op, which makes retries
and resumed sweeps idempotent.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from filelock import FileLock

from merging_core.runtime.io import atomic_write_text

LOCK_TIMEOUT_S = 60


def read_index(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return list(json.loads(path.read_text(encoding="utf-8")))


def format_index(entries: list[dict[str, Any]]) -> str:
    """A JSON list with one entry per line: readable and diffable, and written by json's C
    encoder (an `indent` would select the pure-Python one, and every append rewrites the file,
    so a long sweep would spend its time, and the GIL, re-encoding old entries)."""
    lines = ",\n".join(json.dumps(entry, sort_keys=True, separators=(", ", ": ")) for entry in entries)
    return "[\n" + lines + "\n]\n" if entries else "[]\n"


def update_results_index(path: Path, entry: dict[str, Any]) -> bool:
    """Append `entry` (must have an `id`); return False if that id was already indexed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock", timeout=LOCK_TIMEOUT_S):
        entries = read_index(path)
        if any(existing.get("id") == entry["id"] for existing in entries):
            return False
        entries.append(entry)
        atomic_write_text(path, format_index(entries))
    return True
