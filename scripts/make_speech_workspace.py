"""Synthesize the speech workspace's shipped audio: SNIPS intent utterances spoken by espeak-ng.

The text demo's SNIPS rows (`workspaces/demo/data/intent/{train,test}.jsonl`) are spoken by
Debian's `espeak-ng` in a voice (accent + variant) and a speed drawn per utterance by a seeded
RNG, resampled from espeak's 22050 Hz to 16 kHz mono with soxr, rounded to `RESOLUTION_BITS` and
written as 16-bit FLAC:

    workspaces/speech/data/test.jsonl   + audio/test/*.flac    15 per intent from SNIPS test
    workspaces/speech/data/train.jsonl  + audio/train/*.flac    8 per intent from SNIPS train

A row is {"audio": "audio/test/0001.flac", "text", "intent", "voice", "speed"}: `audio` is
relative to the jsonl file, `text` what espeak was given, `intent` the label as spoken words
("AddToPlaylist" -> "add to playlist"). Utterances with characters other than letters,
apostrophes and plain punctuation (digits are read out as words the transcript does not have)
and those longer than `MAX_SECONDS` once spoken are skipped. Deterministic for a given
espeak-ng build: rows and voices come from seeded RNGs, and the output is checked (sha256 of
each jsonl) against data/README.md, which this script writes.

    python scripts/make_speech_workspace.py               # needs `apt-get install espeak-ng`
    python scripts/make_speech_workspace.py --check       # regenerate in a temp dir, compare

`scripts/train_speech_adapters.py` draws its (unshipped) training audio with `synthesize_split`.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import re
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SNIPS = ROOT / "workspaces" / "demo" / "data" / "intent"
WORKSPACE = ROOT / "workspaces" / "speech"
SAMPLE_RATE = 16000
MAX_SECONDS = 8.0
ACCENTS = ("en-us", "en-gb-x-rp", "en-gb-scotland", "en")
VARIANTS = ("", "+m3", "+f2", "+m7", "+f3")  # "" is the accent's own (male) voice
SPEEDS = (130, 190)  # words per minute, inclusive
# Samples are rounded to 12 bits inside the 16-bit FLAC (multiples of 16): FLAC stores the unused
# low bits for free, so the shipped audio is about 35% smaller (6 MB, not 9.4), and the rounding
# noise (about -74 dB of full scale) lies under what Whisper's log-mel features keep of a clip.
RESOLUTION_BITS = 12
# Letters, apostrophes, spaces and plain punctuation: what espeak reads as the words written.
SPEAKABLE = re.compile(r"[A-Za-z][A-Za-z' ,.?!\-]*")
SHIPPED = {"test": 15, "train": 8}  # clips per intent
SEEDS = {"test": 0, "train": 1}  # the row order of each split; training audio uses its own


@dataclass(frozen=True)
class Clip:
    """One synthesized utterance: its row and its 16 kHz int16 samples."""

    text: str
    intent: str
    voice: str
    speed: int
    samples: np.ndarray  # int16, mono, SAMPLE_RATE

    @property
    def seconds(self) -> float:
        return len(self.samples) / SAMPLE_RATE


def spoken_label(label: str) -> str:
    """A CamelCase SNIPS label as lower-case words: "SearchScreeningEvent" -> "search screening event"."""
    return " ".join(word.lower() for word in re.findall(r"[A-Z][a-z]*", label))


def espeak_version() -> str:
    """`espeak-ng --version`'s first line, e.g. "eSpeak NG text-to-speech: 1.51  Data at: ..."."""
    try:
        out = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=True).stdout
    except FileNotFoundError:
        sys.exit("espeak-ng is not installed: apt-get install -y espeak-ng")
    match = re.search(r"text-to-speech:\s*(\S+)", out)
    return match.group(1) if match else out.strip()


def espeak_package_version() -> str | None:
    """The Debian package's version (e.g. "1.51+dfsg-10+deb12u2"), where dpkg knows it."""
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "espeak-ng"], capture_output=True,
                             text=True, check=True).stdout
    except (FileNotFoundError, subprocess.CalledProcessError):
        return None
    return out.strip() or None


def synthesize(text: str, voice: str, speed: int) -> np.ndarray:
    """`text` spoken by espeak-ng, as 16 kHz mono int16 samples."""
    import soundfile
    import soxr

    wav = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "--stdout", text],
                         capture_output=True, check=True).stdout
    samples, rate = soundfile.read(io.BytesIO(wav), dtype="float32")
    resampled = soxr.resample(samples, rate, SAMPLE_RATE, quality="HQ")
    step = 2 ** (16 - RESOLUTION_BITS)
    rounded = np.round(np.asarray(resampled, dtype=np.float64) * 32768 / step) * step
    return np.clip(rounded, -32768, 32768 - step).astype(np.int16)


def read_rows(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def synthesize_split(rows: list[dict[str, str]], per_intent: int, seed: int, tag: str,
                     exclude_texts: Iterable[str] = (), *, allow_fewer: bool = False) -> list[Clip]:
    """`per_intent` clips per label: each label's rows (file order) shuffled by `Random(seed)`,
    walked until that many are speakable, new and short enough (with `allow_fewer`, as many as
    there are, else too few is an error).

    The voice and speed of a row depend only on `tag`, `seed` and its text, so a row sounds the
    same whichever other rows are drawn.
    """
    excluded = {text.strip() for text in exclude_texts}
    by_label: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        by_label[row["label"]].append(" ".join(row["text"].split()))
    order = random.Random(seed)
    clips = []
    for label in sorted(by_label):
        texts = by_label[label]
        order.shuffle(texts)
        taken: list[Clip] = []
        seen = set(excluded)
        for text in texts:
            if len(taken) == per_intent:
                break
            if text in seen or not SPEAKABLE.fullmatch(text):
                continue
            seen.add(text)
            choice = random.Random(f"{tag}:{seed}:{text}")
            voice = choice.choice(ACCENTS) + choice.choice(VARIANTS)
            speed = choice.randint(*SPEEDS)
            samples = synthesize(text, voice, speed)
            if not 0 < len(samples) <= MAX_SECONDS * SAMPLE_RATE:
                continue
            taken.append(Clip(text, spoken_label(label), voice, speed, samples))
        if len(taken) < per_intent and not allow_fewer:
            raise SystemExit(f"{label}: only {len(taken)} usable utterances, {per_intent} wanted")
        clips += taken
    return clips


def write_split(clips: list[Clip], data_dir: Path, split: str) -> Path:
    """FLAC files under `data_dir/audio/<split>/` and `data_dir/<split>.jsonl`; returns the jsonl."""
    import soundfile

    audio_dir = data_dir / "audio" / split
    shutil.rmtree(audio_dir, ignore_errors=True)
    audio_dir.mkdir(parents=True)
    lines = []
    for number, clip in enumerate(clips, start=1):
        relative = f"audio/{split}/{number:04d}.flac"
        soundfile.write(data_dir / relative, clip.samples, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        lines.append(json.dumps({"audio": relative, "text": clip.text, "intent": clip.intent,
                                 "voice": clip.voice, "speed": clip.speed}, ensure_ascii=False))
    jsonl = data_dir / f"{split}.jsonl"
    jsonl.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return jsonl


def samples_sha256(clips: Iterable[Clip]) -> str:
    """sha256 over each clip's text and int16 samples, in order (independent of the FLAC encoder)."""
    digest = hashlib.sha256()
    for clip in clips:
        digest.update(clip.text.encode("utf-8") + b"\0")
        digest.update(clip.samples.astype("<i2").tobytes())
    return digest.hexdigest()


def shipped_samples_sha256(data_dir: Path) -> str:
    """`samples_sha256` of the clips a data folder holds (test, then train), read back from FLAC."""
    import soundfile

    clips = []
    for split in SHIPPED:
        for row in read_rows(data_dir / f"{split}.jsonl"):
            samples, _ = soundfile.read(data_dir / row["audio"], dtype="int16")
            clips.append(Clip(row["text"], row["intent"], row["voice"], int(row["speed"]), samples))
    return samples_sha256(clips)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


README = """\
# Speech workspace data: SNIPS intent utterances, synthesized

Spoken versions of the text demo's SNIPS intent rows (`../../demo/data/intent/`), for the
speech workspace's two tasks on Whisper tiny.en: `asr` (transcribe `text`) and `intent` (the
spoken label `intent`, scored by likelihood). Every clip is synthetic: Debian's `espeak-ng`
reading the SNIPS text in one of {voice_count} voices, at {speed_low}-{speed_high} words a minute,
chosen per utterance by a seeded RNG:
- accents {accents};
- variants {variants};

espeak's 22050 Hz output resampled to {rate} Hz mono with soxr (HQ), rounded to {bits}-bit
resolution (to keep the files small) and stored as 16-bit FLAC.

| file | rows | per intent | source |
|---|---|---|---|
| `test.jsonl`, `audio/test/` | {test_rows} | {test_per} | SNIPS test (`../../demo/data/intent/test.jsonl`) |
| `train.jsonl`, `audio/train/` | {train_rows} | {train_per} | SNIPS train (`../../demo/data/intent/train.jsonl`) |

The small train split is for selection, AdaMerging and Gram collection, not for adapter
training: `scripts/train_speech_adapters.py` synthesizes its own training audio (not shipped)
from SNIPS train rows disjoint from it.

A row: `{{"audio": "audio/test/0001.flac", "text": ..., "intent": "play music", "voice":
"en-us+f2", "speed": 157}}`; `audio` is relative to the jsonl file, `text` exactly what espeak
was given (SNIPS text with runs of whitespace collapsed), `intent` the CamelCase SNIPS label
as lower-case words. Rows whose text holds anything but letters, apostrophes and plain
punctuation (e.g. digits, which espeak reads as words the transcript lacks) or that last over
{max_seconds:g} s once spoken are skipped. The intents:
{intents}.

## Licences

- Text and labels: SNIPS 2017 custom intents, github.com/sonos/nlu-benchmark, CC0 1.0 (see
  `../../demo/data/README.md`).
- The synthesized audio and these files: ours, CC0 1.0.
- espeak-ng (GPL-3.0) is a tool used to make the audio; its output carries no licence of its own.

## How it was made

espeak-ng {espeak} (Debian package `espeak-ng` {package}), soxr {soxr}, libsndfile {libsndfile}:

    apt-get install -y espeak-ng
    python scripts/make_speech_workspace.py

The same espeak-ng build gives the same samples; `python scripts/make_speech_workspace.py --check`
regenerates into a temporary folder and compares the rows and the samples with these.

| file | sha256 |
|---|---|
| `test.jsonl` | `{test_sha}` |
| `train.jsonl` | `{train_sha}` |
| samples (test then train: text + int16 samples per clip) | `{samples_sha}` |

Total: {clips} clips, {seconds:.0f} s of audio.
"""


def make(data_dir: Path) -> dict[str, object]:
    import soundfile
    import soxr

    clips = {split: synthesize_split(read_rows(SNIPS / f"{split}.jsonl"), per_intent, SEEDS[split], split)
             for split, per_intent in SHIPPED.items()}
    jsonls = {split: write_split(split_clips, data_dir, split) for split, split_clips in clips.items()}
    every = clips["test"] + clips["train"]
    summary = {
        "espeak_ng": espeak_version(), "espeak_ng_package": espeak_package_version(),
        "test_sha256": file_sha256(jsonls["test"]), "train_sha256": file_sha256(jsonls["train"]),
        "samples_sha256": samples_sha256(every), "clips": len(every),
        "seconds": round(sum(clip.seconds for clip in every), 1),
        "longest_seconds": round(max(clip.seconds for clip in every), 2),
    }
    (data_dir / "README.md").write_text(README.format(
        voice_count=len(ACCENTS) * len(VARIANTS), accents=", ".join(f"`{a}`" for a in ACCENTS),
        variants=", ".join(f"`{v}`" if v else "none" for v in VARIANTS), speed_low=SPEEDS[0],
        speed_high=SPEEDS[1], rate=SAMPLE_RATE, bits=RESOLUTION_BITS, test_rows=len(clips["test"]), test_per=SHIPPED["test"],
        train_rows=len(clips["train"]), train_per=SHIPPED["train"], max_seconds=MAX_SECONDS,
        intents=", ".join(f'"{i}"' for i in sorted({c.intent for c in every})),
        espeak=summary["espeak_ng"], package=summary["espeak_ng_package"] or "unknown",
        soxr=soxr.__version__, libsndfile=soundfile.__libsndfile_version__,
        test_sha=summary["test_sha256"], train_sha=summary["train_sha256"],
        samples_sha=summary["samples_sha256"], clips=len(every), seconds=summary["seconds"]), encoding="utf-8")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=WORKSPACE / "data", help="the data folder to write")
    parser.add_argument("--check", action="store_true",
                        help="regenerate into a temporary folder and compare with --out's rows and samples")
    args = parser.parse_args(argv)
    if not args.check:
        print(json.dumps(make(args.out), indent=2))
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        summary = make(Path(scratch))
        mismatched = [f"{split}.jsonl" for split in SHIPPED
                      if file_sha256(Path(scratch) / f"{split}.jsonl") != file_sha256(args.out / f"{split}.jsonl")]
    if summary["samples_sha256"] != shipped_samples_sha256(args.out):
        mismatched.append("audio samples")
    print(json.dumps(summary, indent=2))
    if mismatched:
        print(f"differs from {args.out}: {mismatched}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
