"""A tiny random Whisper workspace for the speech tests: the model folder (config, generation
config, byte-level tokenizer with Whisper's special tokens, a feature extractor that hears 1 s),
two real PEFT LoRA adapters (encoder and decoder attention), and short clips synthesized here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import yaml

SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|translate|>", "<|transcribe|>",
            "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>"]
RATE = 16000
INTENTS = ["music", "route", "table"]  # equal lengths: no label wins by its length alone


def byte_level_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, in byte order (its byte-level BPE's base)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    stand_ins, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            stand_ins[byte] = chr(byte)
        else:
            stand_ins[byte], extra = chr(256 + extra), extra + 1
    return [stand_ins[byte] for byte in range(256)]


def tiny_whisper(folder: Path, seed: int = 0) -> Path:
    """A random Whisper (2 encoder and 2 decoder layers, d_model 16) with its processor."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizerFast,
    )

    alphabet = byte_level_alphabet()
    backend = Tokenizer(models.BPE(vocab={token: index for index, token in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(token, normalized=False, special=True) for token in SPECIALS])
    tokenizer = WhisperTokenizerFast(tokenizer_object=backend, unk_token="<|endoftext|>", bos_token="<|endoftext|>",
                                     eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    ids = {token: 256 + index for index, token in enumerate(SPECIALS)}
    torch.manual_seed(seed)
    # The feature extractor hears 1 s (100 frames), so the encoder has 50 positions.
    config = WhisperConfig(
        vocab_size=256 + len(SPECIALS), d_model=16, num_mel_bins=8, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        max_source_positions=50, max_target_positions=32, pad_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|startoftranscript|>"],
        decoder_start_token_id=ids["<|startoftranscript|>"], tie_word_embeddings=True)
    model = WhisperForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"], bos_token_id=ids["<|startoftranscript|>"],
        eos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"], max_length=32, is_multilingual=False,
        no_timestamps_token_id=ids["<|notimestamps|>"], prev_sot_token_id=ids["<|startofprev|>"],
        return_timestamps=False, suppress_tokens=[], begin_suppress_tokens=[ids["<|endoftext|>"]])
    model.save_pretrained(folder)
    extractor = WhisperFeatureExtractor(feature_size=8, sampling_rate=RATE, chunk_length=1)
    WhisperProcessor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def lora_adapter(base: Path, out: Path, seed: int) -> Path:
    """A real PEFT LoRA (r=4 on q_proj and v_proj: encoder self-attention, decoder self- and
    cross-attention) with random non-zero B, saved."""
    from peft import LoraConfig, get_peft_model
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  lora_dropout=0.0))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    peft_model.save_pretrained(out)
    return out


def clip(seconds: float, seed: int, rate: int = RATE) -> np.ndarray:
    """A short synthetic clip: a few tones with noise, in [-1, 1]."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    tones = sum(np.sin(2 * np.pi * f * t) for f in rng.uniform(100, 2000, size=3))
    return (0.2 * tones / 3 + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)


def speech_workspace(root: Path, clips_per_split: int = 6) -> Path:
    """A workspace with an `asr` and an `intent` task over the same clips (FLAC files)."""
    import soundfile

    base = tiny_whisper(root / "base")
    lora_adapter(base, root / "adapters" / "asr", seed=1)
    lora_adapter(base, root / "adapters" / "intent", seed=2)
    words = ["play the song", "weather in paris", "book a table", "add this track", "rate it five",
             "find the film", "what time", "show me"]
    for split, offset in (("train", 0), ("test", 100)):
        folder = root / "data" / "audio" / split
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for index in range(clips_per_split):
            name = f"{index:03d}.flac"
            # A rate of its own for some clips: decoding resamples them to 16 kHz.
            rate = 22050 if index % 3 == 0 else RATE
            soundfile.write(folder / name, clip(0.3 + 0.1 * (index % 5), offset + index, rate), rate,
                            subtype="PCM_16")
            rows.append({"audio": f"audio/{split}/{name}", "text": words[(index + offset) % len(words)],
                         "intent": INTENTS[index % len(INTENTS)]})
        (root / "data" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = {"train": "data/train.jsonl", "test": "data/test.jsonl"}
    spec = {
        "name": "tiny-speech",
        "base_model": {"path": "base", "model_class": "speech_seq2seq", "device": "cpu"},
        "tasks": {
            "asr": {"adapter": "adapters/asr", "data": data, "audio_column": "audio", "reference_column": "text",
                    "evaluator": "speech_recognition", "primary_metric": "wer", "batch_size": 4,
                    "max_new_tokens": 6},
            "intent": {"adapter": "adapters/intent", "data": data, "audio_column": "audio", "label_column": "intent",
                       "labels": INTENTS, "evaluator": "seq2seq_label_scoring", "batch_size": 4},
        },
    }
    path = root / "workspace.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path
