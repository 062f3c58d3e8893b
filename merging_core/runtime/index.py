"""The append-only eval index (`eval/index.json`): a JSON list of every evaluation, one per line.

Appends happen under a file lock, so concurrent writers lose no entry. Entries carry an `id`;
appending an id that is already there is a no-op, which makes retries and resumed sweeps
idempotent.

An append writes only the new entry: it replaces the closing `\\n]\\n` with `,\\n<entry>\\n]\\n`
and fsyncs the file. Rewriting the whole list for every entry (as this module once did) made
each trial of a long sweep slower than the last and flooded the disk with fsyncs of a growing
file. A torn append (the writer died mid-write) leaves an unfinished last line: readers drop
it, and the next append rewrites the file whole, atomically, from the complete entries. The
ids already in a file are cached per process, keyed by the file's size and mtime, so an append
does not re-read the file another writer has not touched.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from filelock import FileLock

from merging_core.runtime.io import atomic_write_text

LOCK_TIMEOUT_S = 60
_CLOSING = b"\n]\n"
# path -> ((size, mtime_ns), ids): what this process last saw of each index file.
_KNOWN_IDS: dict[Path, tuple[tuple[int, int], set[str]]] = {}


_DECODER = json.JSONDecoder()


def _parse(text: str) -> tuple[list[dict[str, Any]], bool]:
    """The entries of an index file, and whether it was complete (not torn mid-append).

    A torn file is read entry by entry from the start (each entry is one JSON object, whatever
    the layout: ours has one per line, the seed's is indented), up to the unfinished one."""
    try:
        return list(json.loads(text)), True
    except json.JSONDecodeError:
        entries: list[dict[str, Any]] = []
        position = text.find("{")
        while position != -1:
            try:
                entry, end = _DECODER.raw_decode(text, position)
            except json.JSONDecodeError:
                break  # the unfinished entry
            entries.append(entry)
            position = text.find("{", end)
        return entries, False


def read_index(path: Path) -> list[dict[str, Any]]:
    """Every complete entry (an unfinished last line, left by a writer that died, is dropped)."""
    if not Path(path).is_file():
        return []
    return _parse(Path(path).read_text(encoding="utf-8"))[0]


def _entry_line(entry: dict[str, Any]) -> str:
    # json's C encoder (an `indent` would select the pure-Python one)
    return json.dumps(entry, sort_keys=True, separators=(", ", ": "))


def format_index(entries: list[dict[str, Any]]) -> str:
    """A JSON list with one entry per line: readable, diffable, and appendable in place."""
    lines = ",\n".join(_entry_line(entry) for entry in entries)
    return "[\n" + lines + "\n]\n" if entries else "[]\n"


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _append_in_place(path: Path, line: str) -> None:
    with path.open("r+b") as handle:
        handle.seek(-len(_CLOSING), os.SEEK_END)
        handle.write(b",\n" + line.encode("utf-8") + _CLOSING)
        handle.flush()
        os.fsync(handle.fileno())


def update_results_index(path: Path, entry: dict[str, Any]) -> bool:
    """Append `entry` (must have an `id`); return False if that id was already indexed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock", timeout=LOCK_TIMEOUT_S):
        known = _KNOWN_IDS.get(path)
        complete = True
        if path.is_file() and known is not None and known[0] == _stamp(path):
            ids, entries = known[1], None
        else:
            text = path.read_text(encoding="utf-8") if path.is_file() else "[]\n"
            entries, complete = _parse(text)
            # In place only onto our own layout (one entry per line); any other (the seed's
            # indented one, a torn file) is rewritten whole once.
            complete = complete and text == format_index(entries)
            ids = {str(existing.get("id")) for existing in entries}
        if str(entry["id"]) in ids:
            return False
        if entries is None or (complete and entries):
            _append_in_place(path, _entry_line(entry))
        else:  # a new, empty or torn index: write it whole, atomically
            atomic_write_text(path, format_index([*entries, entry]))
        ids.add(str(entry["id"]))
        _KNOWN_IDS[path] = (_stamp(path), ids)
    return True
