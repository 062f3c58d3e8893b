"""Audio inputs of speech tasks: clips decoded once, mono, at the feature extractor's rate.

A row's `audio_column` holds one of:
- a path to a clip (any format libsndfile reads: FLAC, WAV, OGG, ...), relative to the data file;
- the samples themselves (a list or array of numbers), with the row's `sample_rate_column`;
- a dict with encoded `bytes` (and an optional `path`), as Hugging Face datasets stores its
  `Audio` feature in parquet.
Multichannel audio is averaged to mono, then resampled with soxr (high quality) when its rate is
not the model's. Every problem (a missing or unreadable file, an empty clip, a rate that cannot
be resampled, a clip longer than the model hears) is a `ConfigError` naming the file and row.

A clip is known by a content key, `<source>#<sha256 of its samples, 16 hex>`: the task's inputs
are these keys (what subsets, caches and checksums see), and the samples live in a `ClipStore`
the model holder keeps. Equal keys mean equal samples, so one store serves every task.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from merging_core.errors import ConfigError

MIN_SAMPLE_RATE = 1000  # below this a "rate" is a mistake (seconds? kHz?), not audio


@dataclass(frozen=True)
class AudioColumns:
    """How a split's rows hold audio, and the rate the model wants."""

    column: str
    sample_rate_column: str | None
    target_rate: int
    max_seconds: float | None  # the longest clip the model hears whole (Whisper: 30 s)


class ClipStore(dict[str, np.ndarray]):
    """Content key -> float32 mono samples at the model's rate."""

    def samples(self, key: str) -> np.ndarray:
        try:
            return self[key]
        except KeyError:
            raise ConfigError(f"audio clip {key!r} is not loaded: audio inputs come from a task's data") from None


def _decode_file(source: Any) -> tuple[np.ndarray, int]:
    import soundfile

    samples, rate = soundfile.read(source, dtype="float32", always_2d=True)
    return samples, int(rate)


def _resample(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    import soxr

    return np.asarray(soxr.resample(samples, rate, target, quality="HQ"), dtype=np.float32)


def decode_clip(value: Any, row: Mapping[str, Any], *, data_path: Path, number: int,
                spec: AudioColumns) -> tuple[str, np.ndarray]:
    """One row's clip as (content key, mono float32 samples at `spec.target_rate`)."""
    where = f"{data_path} row {number}"
    if isinstance(value, str):
        clip = Path(value).expanduser()
        clip = clip if clip.is_absolute() else data_path.parent / clip
        where = f"{where} ({clip})"
        if not clip.is_file():
            raise ConfigError(f"{where}: audio file not found")
        label = value
        try:
            samples, rate = _decode_file(clip)
        except Exception as exc:  # libsndfile's errors carry no common base class across versions
            raise ConfigError(f"{where}: cannot read the audio file: {exc}") from None
    elif isinstance(value, Mapping) and value.get("bytes") is not None:
        label = str(value.get("path") or f"{data_path.name}:row{number}")
        try:
            samples, rate = _decode_file(io.BytesIO(value["bytes"]))
        except Exception as exc:
            raise ConfigError(f"{where}: cannot decode the audio bytes: {exc}") from None
    elif isinstance(value, (list, tuple, np.ndarray)):
        label = f"{data_path.name}:row{number}"
        if spec.sample_rate_column is None:
            raise ConfigError(f"{where}: column {spec.column!r} holds samples, so the task needs a "
                              "sample_rate_column giving their rate")
        raw_rate = row.get(spec.sample_rate_column)
        try:
            rate = int(raw_rate)  # type: ignore[arg-type]
            if rate != raw_rate:
                raise ValueError
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: sample rate {raw_rate!r} (column {spec.sample_rate_column!r}) is not "
                              "a whole number of samples per second") from None
        try:
            samples = np.asarray(value, dtype=np.float32)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: column {spec.column!r} is not a list of numbers") from None
        if samples.ndim != 1:
            raise ConfigError(f"{where}: column {spec.column!r} must hold one channel of samples, "
                              f"got shape {samples.shape}")
        samples = samples[:, None]
    else:
        raise ConfigError(f"{where}: column {spec.column!r} must be a clip path, a list of samples or "
                          f"{{'bytes': ...}}, got {type(value).__name__}")
    if rate < MIN_SAMPLE_RATE:
        raise ConfigError(f"{where}: sample rate {rate} Hz cannot be resampled to {spec.target_rate} Hz "
                          f"(rates below {MIN_SAMPLE_RATE} Hz are not audio)")
    if samples.shape[0] == 0:
        raise ConfigError(f"{where}: the clip is empty (0 samples)")
    if not np.isfinite(samples).all():
        raise ConfigError(f"{where}: the clip has NaN or infinite samples")
    seconds = samples.shape[0] / rate
    if spec.max_seconds is not None and seconds > spec.max_seconds:
        raise ConfigError(f"{where}: the clip is {seconds:.1f} s long; the model hears {spec.max_seconds:g} s "
                          "at most, so cut it first")
    mono = samples.mean(axis=1, dtype=np.float32)
    if rate != spec.target_rate:
        mono = _resample(mono, rate, spec.target_rate)
    digest = hashlib.sha256(np.ascontiguousarray(mono).tobytes()).hexdigest()[:16]
    return f"{label}#{digest}", mono
