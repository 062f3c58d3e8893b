"""The speech workspace's shipped files hold together, without a model: every row's clip is a
short 16 kHz mono FLAC, the labels are SNIPS's seven intents as words, the jsonl files are the
ones data/README.md records, and the adapters are the LoRA shape the workspace promises, each
with a training.json that says which espeak-ng made its training audio."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile
import yaml

WORKSPACE = Path(__file__).resolve().parents[1] / "workspaces" / "speech"
DATA = WORKSPACE / "data"
INTENTS = {"add to playlist", "book restaurant", "get weather", "play music", "rate book",
           "search creative work", "search screening event"}
PER_INTENT = {"test": 15, "train": 8}


def _rows(split: str) -> list[dict[str, object]]:
    lines = (DATA / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


@pytest.mark.parametrize("split", sorted(PER_INTENT))
def test_every_clip_is_short_16khz_mono_audio(split: str) -> None:
    rows = _rows(split)
    assert len(rows) == PER_INTENT[split] * len(INTENTS)
    for row in rows:
        assert set(row) == {"audio", "text", "intent", "voice", "speed"}, row
        path = DATA / str(row["audio"])
        assert path.is_file(), path
        samples, rate = soundfile.read(path, dtype="int16", always_2d=True)
        assert rate == 16000, path
        assert samples.shape[1] == 1, path
        assert 0 < len(samples) < 10 * rate, path
        assert np.abs(samples).max() > 0, f"{path} is silent"
        assert str(row["text"]).strip(), row


@pytest.mark.parametrize("split", sorted(PER_INTENT))
def test_labels_are_the_seven_intents_balanced(split: str) -> None:
    counts = Counter(row["intent"] for row in _rows(split))
    assert counts == {intent: PER_INTENT[split] for intent in INTENTS}


def test_splits_do_not_share_utterances() -> None:
    assert not {row["text"] for row in _rows("test")} & {row["text"] for row in _rows("train")}


def test_jsonl_checksums_match_the_data_readme() -> None:
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    for split in PER_INTENT:
        recorded = re.search(rf"\| `{split}\.jsonl` \| `([0-9a-f]{{64}})` \|", readme)
        assert recorded, f"data/README.md records no sha256 for {split}.jsonl"
        assert hashlib.sha256((DATA / f"{split}.jsonl").read_bytes()).hexdigest() == recorded.group(1)


def test_workspace_names_the_shipped_adapters_and_data() -> None:
    config = yaml.safe_load((WORKSPACE / "workspace.yaml").read_text(encoding="utf-8"))
    assert config["base_model"]["model_class"] == "speech_seq2seq"
    assert set(config["tasks"]) == {"asr", "intent"}
    for task in config["tasks"].values():
        assert (WORKSPACE / task["adapter"] / "adapter_config.json").is_file()
        for path in task["data"].values():
            assert (WORKSPACE / path).is_file()


@pytest.mark.parametrize("task", ["asr", "intent"])
def test_adapter_is_a_small_r8_lora_on_the_attention_projections(task: str) -> None:
    folder = WORKSPACE / "adapters" / task
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    assert config["peft_type"] == "LORA"
    assert config["r"] == 8 and config["lora_alpha"] == 16
    assert set(config["target_modules"]) == {"q_proj", "v_proj"}
    assert not str(config["base_model_name_or_path"]).startswith(("/", "~")), "a machine's path"
    weights = folder / "adapter_model.safetensors"
    assert 0 < weights.stat().st_size < 1_000_000


@pytest.mark.parametrize("task", ["asr", "intent"])
def test_training_record_names_espeak_and_the_training_audio(task: str) -> None:
    record = json.loads((WORKSPACE / "adapters" / task / "training.json").read_text(encoding="utf-8"))
    assert record["task"] == task
    audio = record["training_audio"]
    assert re.fullmatch(r"\d+\.\d+(\.\d+)?", audio["espeak_ng"])
    assert re.fullmatch(r"[0-9a-f]{64}", audio["samples_sha256"])
    shipped = {row["text"] for split in PER_INTENT for row in _rows(split)}
    assert not shipped & {row["text"] for row in audio["rows"]}, "training audio overlaps the shipped splits"
