"""Task data on disk: jsonl, csv or parquet, with configurable columns."""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merging_core.errors import ConfigError
from merging_core.evaluation.audio import AudioColumns, ClipStore, decode_clip


@dataclass(frozen=True)
class TaskData:
    """One split of a task: inputs, and labels (classification) or references (generation).

    For audio tasks the inputs are clip content keys (`evaluation.audio`), and `clips` holds
    their samples."""

    texts: list[str]
    labels: list[str] | None = None
    references: list[str] | None = None
    clips: ClipStore | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def checksum(self) -> str:
        """sha256 over every input with its label or reference (what cached results depend on)."""
        digest = hashlib.sha256()
        targets = self.labels or self.references or [""] * len(self.texts)
        for text, target in zip(self.texts, targets):
            digest.update(text.encode())
            digest.update(b"\x1f")
            digest.update(target.encode())
            digest.update(b"\x1e")
        return digest.hexdigest()

    def select(self, indices: list[int]) -> TaskData:
        return TaskData(
            texts=[self.texts[i] for i in indices],
            labels=[self.labels[i] for i in indices] if self.labels is not None else None,
            references=[self.references[i] for i in indices] if self.references is not None else None,
            clips=self.clips,
        )


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise ConfigError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = []
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise ConfigError(f"{path}:{number}: not a JSON object: {exc}") from None
        return rows
    if suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as handle:
            return list(csv.DictReader(handle))
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise ConfigError(f"unsupported data file {path}: use .jsonl, .csv or .parquet")


def render_prompts(path: Path, rows: list[dict[str, Any]], template: str) -> list[str]:
    """`template.format(**row)` for every row; a column it names that a row lacks is an error
    naming the column and the row."""
    prompts = []
    for number, row in enumerate(rows, start=1):
        try:
            prompts.append(template.format_map({k: "" if v is None else v for k, v in row.items()}))
        except KeyError as exc:
            raise ConfigError(
                f"{path}: prompt_template names column {exc.args[0]!r}, which row {number} lacks "
                f"(its columns: {', '.join(sorted(row))})"
            ) from None
        except (ValueError, IndexError, AttributeError, TypeError) as exc:
            raise ConfigError(f"prompt_template {template!r} cannot be filled from row {number}: {exc}") from None
    return prompts


def load_task_data(
    path: Path,
    *,
    text_column: str,
    label_column: str | None = None,
    reference_column: str | None = None,
    prompt_template: str | None = None,
    audio: AudioColumns | None = None,
) -> TaskData:
    """Read a split; a configured column that is missing is an error naming it. With a
    `prompt_template`, each input is the template filled from its row's columns; with `audio`,
    each input is a clip, decoded now (so a bad clip fails before any work starts)."""
    rows = read_rows(path)
    if not rows:
        raise ConfigError(f"data file {path} has no rows")

    def require(name: str) -> None:
        missing = [i for i, row in enumerate(rows) if name not in row]
        if missing:
            raise ConfigError(f"{path}: column {name!r} missing (first at row {missing[0] + 1})")

    def column(name: str) -> list[str]:
        require(name)
        return [str(row[name]) for row in rows]

    clips = None
    if audio is not None:
        require(audio.column)  # a missing column is named before any clip is decoded
        clips = ClipStore()
        texts = []
        for number, row in enumerate(rows, start=1):
            key, samples = decode_clip(row[audio.column], row, data_path=path, number=number, spec=audio)
            clips[key] = samples
            texts.append(key)
    elif prompt_template:
        texts = render_prompts(path, rows, prompt_template)
    else:
        texts = column(text_column)
    return TaskData(
        texts=texts,
        clips=clips,
        labels=column(label_column) if label_column else None,
        references=column(reference_column) if reference_column else None,
    )
