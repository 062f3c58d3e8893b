"""Speech tasks on a tiny random Whisper with real PEFT LoRA adapters and clips synthesized here:
`speech_recognition` and `seq2seq_label_scoring` against one-clip-at-a-time computations,
AdaMerging's entropy for both against direct computations, the per-task subset, the bad-clip
errors, and one merge with AdaMerging through the real service."""

from __future__ import annotations

import io
import json
from pathlib import Path

import jiwer
import numpy as np
import pytest
import soundfile
import torch
import yaml

from app.settings import Settings
from merging_core import run_merge
from merging_core.config.schema import EvalSubsetConfig
from merging_core.errors import ConfigError
from merging_core.evaluation.evaluate import EvalSession
from merging_core.evaluation.evaluators import (
    seq2seq_label_scores,
    speech_label_entropy,
    speech_normalise,
    transcript_entropy,
)
from merging_core.evaluation.workspace import load_workspace
from tests.service_helpers import thread_server, wait_job
from tests.speech_helpers import INTENTS, clip, speech_workspace


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return speech_workspace(tmp_path_factory.mktemp("speech"))


@pytest.fixture(scope="module")
def session(workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> EvalSession:
    return EvalSession.from_workspace(load_workspace(workspace), tmp_path_factory.mktemp("speech_artifacts"))


def _rows(workspace: Path, split: str = "test") -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in (workspace.parent / "data" / f"{split}.jsonl").read_text().splitlines()]


def _features(session: EvalSession, workspace: Path, row: dict) -> torch.Tensor:  # type: ignore[type-arg]
    """One clip's features, read and resampled here (soundfile, soxr), not by the task loader."""
    import soxr

    samples, rate = soundfile.read(workspace.parent / "data" / row["audio"], dtype="float32")
    if rate != 16000:
        samples = soxr.resample(samples, rate, 16000, quality="HQ")
    extractor = session.holder.feature_extractor
    return extractor(samples, sampling_rate=16000, return_tensors="pt").input_features


def _label_ids(session: EvalSession) -> list[list[int]]:
    tokenizer = session.holder.tokenizer
    return [tokenizer(" " + label, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            for label in INTENTS]


def test_transcripts_match_one_clip_at_a_time(session: EvalSession, workspace: Path) -> None:
    metrics = session.evaluate_output(session.task_output("asr"), ["asr"], "test", None)["asr"]
    model, tokenizer = session.holder.model, session.holder.tokenizer
    prefix = session.holder.decoder_prefix()
    hypotheses, references = [], []
    with session.holder.applied(session.task_output("asr")), torch.inference_mode():
        for row in _rows(workspace):
            ids = torch.tensor([prefix])
            for _ in range(6):  # greedy, one token at a time, full recomputation
                logits = model(input_features=_features(session, workspace, row), decoder_input_ids=ids).logits
                if ids.shape[1] == len(prefix):  # Whisper suppresses end-of-text as the first token
                    logits[0, -1, tokenizer.eos_token_id] = -torch.inf
                token = int(logits[0, -1].argmax())
                ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
                if token == tokenizer.eos_token_id:
                    break
            text = tokenizer.decode(ids[0, len(prefix):], skip_special_tokens=True)
            hypotheses.append(speech_normalise(text) or "<empty>")
            references.append(speech_normalise(row["text"]))
    assert metrics.direction == "lower" and metrics.primary == metrics.metrics["wer"]
    assert metrics.metrics["wer"] == pytest.approx(jiwer.wer(references, hypotheses))
    assert metrics.metrics["cer"] == pytest.approx(jiwer.cer(references, hypotheses))
    assert metrics.num_samples == 6


def test_label_scoring_matches_one_pass_per_clip_and_label(session: EvalSession, workspace: Path) -> None:
    metrics = session.evaluate_output(session.task_output("intent"), ["intent"], "test", None)["intent"]
    model, prefix = session.holder.model, session.holder.decoder_prefix()
    label_ids = _label_ids(session)
    correct = 0
    with session.holder.applied(session.task_output("intent")), torch.inference_mode():
        rows = _rows(workspace)
        features = torch.cat([_features(session, workspace, row) for row in rows])
        batched = seq2seq_label_scores(model, features, prefix, label_ids)
        for index, row in enumerate(rows):
            scores = []
            for ids in label_ids:
                logits = model(input_features=features[index:index + 1],
                               decoder_input_ids=torch.tensor([prefix + ids])).logits.float()
                log_probs = torch.log_softmax(logits[0], dim=-1)
                scores.append(sum(float(log_probs[len(prefix) - 1 + k, t]) for k, t in enumerate(ids)))
            torch.testing.assert_close(batched[index], torch.tensor(scores), atol=1e-4, rtol=0)
            correct += INTENTS[scores.index(max(scores))] == row["intent"]
    assert metrics.primary == pytest.approx(correct / len(rows))
    assert set(metrics.metrics) == {"accuracy", "macro_f1"} and metrics.direction == "higher"


def test_adamerging_entropies_match_direct_computations(session: EvalSession, workspace: Path) -> None:
    config = session.workspace.task("intent")
    keys = session.unlabeled_texts("intent", "train")[:3]
    model, prefix = session.holder.model, session.holder.decoder_prefix()
    features = session.holder.features(keys)
    with session.holder.applied(session.task_output("intent")):
        entropy = speech_label_entropy(session.holder, config, keys, INTENTS)
        assert entropy.requires_grad  # differentiable: AdaMerging trains through it
        with torch.no_grad():
            direct = []
            for index in range(len(keys)):
                scores = torch.tensor([
                    sum(float(torch.log_softmax(model(input_features=features[index:index + 1],
                                                      decoder_input_ids=torch.tensor([prefix + ids])).logits[0],
                                                dim=-1)[len(prefix) - 1 + k, t]) for k, t in enumerate(ids))
                    for ids in _label_ids(session)])
                p = torch.softmax(scores, dim=0)
                direct.append(float(-(p * p.log()).sum()))
        assert float(entropy) == pytest.approx(sum(direct) / len(direct), abs=1e-4)
        assert float(entropy) > 0.01  # not a trivially peaked distribution

        asr = session.workspace.task("asr")
        entropy = transcript_entropy(session.holder, asr, keys, [])
        with torch.no_grad():
            total, count = 0.0, 0
            for index in range(len(keys)):
                generated = model.generate(input_features=features[index:index + 1], max_new_tokens=asr.max_new_tokens,
                                           do_sample=False)[0].tolist()
                eos = session.holder.tokenizer.eos_token_id
                generated = generated[: generated.index(eos) + 1] if eos in generated else generated
                ids = torch.tensor([prefix + generated])
                log_probs = torch.log_softmax(
                    model(input_features=features[index:index + 1], decoder_input_ids=ids).logits[0].float(), -1)
                for position in range(len(prefix) - 1, ids.shape[1] - 1):
                    total += float(-(log_probs[position].exp() * log_probs[position]).sum())
                    count += 1
        assert float(entropy) == pytest.approx(total / count, abs=1e-4)


def test_a_per_task_subset_evaluates_only_its_task_s_rows(session: EvalSession) -> None:
    subset = EvalSubsetConfig(max_samples=100, per_task={"asr": {"max_samples": 2}})
    metrics = session.evaluate_output(None, ["asr", "intent"], "test", subset)
    assert metrics["asr"].num_samples == 2 and metrics["intent"].num_samples == 6


def _workspace_with(tmp_path: Path, workspace: Path, rows: list[dict], **task: object) -> Path:  # type: ignore[type-arg]
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = yaml.safe_load(workspace.read_text())
    spec["base_model"]["path"] = str(workspace.parent / "base")
    spec["tasks"] = {"asr": {"adapter": str(workspace.parent / "adapters" / "asr"), "data": {"test": "bad.jsonl"},
                             "audio_column": "audio", "reference_column": "text", "evaluator": "speech_recognition",
                             "primary_metric": "wer", **task}}
    (tmp_path / "workspace.yaml").write_text(yaml.safe_dump(spec))
    return tmp_path / "workspace.yaml"


def _flac_bytes(samples: np.ndarray, rate: int) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


@pytest.mark.parametrize(("case", "message"), [
    ("missing", "row 2 ({dir}/nowhere.flac): audio file not found"),
    ("unreadable", "row 2 ({dir}/garbage.flac): cannot read the audio file"),
    ("empty", "row 2 ({dir}/empty.wav): the clip is empty"),
    ("rate", "row 2: sample rate 8 Hz cannot be resampled to 16000 Hz"),
    ("rate_text", "row 2: sample rate 'fast' (column 'rate') is not a whole number"),
    ("no_rate_column", "row 1: column 'audio' holds samples, so the task needs a sample_rate_column"),
    ("too_long", "row 2 ({dir}/long.flac): the clip is 1.5 s long; the model hears 1 s at most"),
    ("not_audio", "row 2: column 'audio' must be a clip path, a list of samples"),
])
def test_bad_clips_are_clear_errors_naming_the_file_and_row(session: EvalSession, workspace: Path, tmp_path: Path,
                                                            case: str, message: str) -> None:
    good = {"audio": str(workspace.parent / "data" / "audio" / "test" / "001.flac"), "text": "hi"}
    soundfile.write(tmp_path / "long.flac", clip(1.5, 0), 16000)
    (tmp_path / "garbage.flac").write_bytes(b"not audio at all" * 10)
    soundfile.write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    samples = clip(0.2, 1).tolist()
    bad, task = {
        "missing": ({"audio": "nowhere.flac"}, {}),
        "unreadable": ({"audio": "garbage.flac"}, {}),
        "empty": ({"audio": "empty.wav"}, {}),
        "rate": ({"audio": samples, "rate": 8}, {"sample_rate_column": "rate"}),
        "rate_text": ({"audio": samples, "rate": "fast"}, {"sample_rate_column": "rate"}),
        "no_rate_column": ({"audio": samples}, {}),
        "too_long": ({"audio": "long.flac"}, {}),
        "not_audio": ({"audio": 3}, {}),
    }[case]
    first = {"audio": samples, "rate": 16000, "text": "hi"} if task or case == "no_rate_column" else good
    path = _workspace_with(tmp_path, workspace, [first, {**bad, "text": "hi"}], **task)
    other = EvalSession(load_workspace(path), session.holder, tmp_path / "artifacts")
    with pytest.raises(ConfigError) as error:
        other.split_data("asr", "test")
    assert message.format(dir=tmp_path) in str(error.value)
    assert str(tmp_path / "bad.jsonl") in str(error.value)
    assert not (tmp_path / "artifacts").exists()  # nothing written


def test_samples_and_encoded_bytes_in_a_parquet_column_decode_like_files(session: EvalSession, workspace: Path,
                                                                          tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = _rows(workspace)[0]  # a 22050 Hz file: resampled on reading
    samples, rate = soundfile.read(workspace.parent / "data" / row["audio"], dtype="float32")
    table = pa.table({"audio": [samples.tolist()], "rate": [rate], "text": ["x"]})
    pq.write_table(table, tmp_path / "arrays.parquet")
    encoded = pa.table({"audio": [{"bytes": _flac_bytes(samples, rate), "path": "clip.flac"}], "text": ["x"]})
    pq.write_table(encoded, tmp_path / "bytes.parquet")
    from_file = session.split_data("asr", "test")
    expected = session.holder.clips.samples(from_file.texts[0])
    for name, extra in (("arrays.parquet", {"sample_rate_column": "rate"}), ("bytes.parquet", {})):
        path = _workspace_with(tmp_path, workspace, [], **extra)
        spec = yaml.safe_load(path.read_text())
        spec["tasks"]["asr"]["data"] = {"test": name}
        path.write_text(yaml.safe_dump(spec))
        data = EvalSession(load_workspace(path), session.holder, tmp_path / "a").split_data("asr", "test")
        np.testing.assert_allclose(data.clips.samples(data.texts[0]), expected, atol=1e-4)  # FLAC is 16-bit


def test_audio_tasks_need_a_speech_model(workspace: Path, tmp_path: Path) -> None:
    spec = yaml.safe_load(workspace.read_text())
    spec["base_model"]["model_class"] = "causal_lm"
    spec["base_model"]["path"] = str(workspace.parent / "base")
    (tmp_path / "w.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="audio_column needs base_model.model_class speech_seq2seq"):
        load_workspace(tmp_path / "w.yaml")
    spec["base_model"]["model_class"] = "speech_seq2seq"
    spec["tasks"]["asr"]["evaluator"] = "generation"
    (tmp_path / "w.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="evaluator 'generation' does not take audio; use one of speech_recognition"):
        load_workspace(tmp_path / "w.yaml")


def test_more_new_tokens_than_the_decoder_holds_is_a_clear_error(session: EvalSession) -> None:
    from merging_core.errors import EvaluationError
    from merging_core.evaluation.evaluators import transcribe

    keys = session.unlabeled_texts("asr", "test")[:1]
    with pytest.raises(EvaluationError, match="max_new_tokens 40 is too many: the decoder holds 32 positions"):
        transcribe(session.holder, keys, 40)


def test_merge_and_adamerging_through_the_service(workspace: Path, tmp_path: Path) -> None:
    """[asr, intent] merged on the worker's resident Whisper: WER, accuracy and interference for
    both tasks; then AdaMerging on both tasks' entropies."""
    settings = Settings(workspace=workspace, artifacts_dir=tmp_path / "artifacts")
    with thread_server(settings) as (client, _app):
        answer = client.post("/merges", json={"adapters": ["asr", "intent"], "method": "ties",
                                              "eval_tasks": ["asr", "intent"]})
        assert answer.status_code == 202, answer.text
        job = wait_job(client, answer.json()["id"])
        assert job["status"] == "succeeded", job["error"]
        evaluation = job["result"]["evaluation"]
        asr, intent = evaluation["tasks"]["asr"], evaluation["tasks"]["intent"]
        assert asr["merged"]["primary_metric"] == "wer" and asr["merged"]["direction"] == "lower"
        assert {"wer", "cer"} <= set(asr["merged"]["metrics"])
        assert intent["merged"]["primary_metric"] == "accuracy"
        assert evaluation["metrics"]["asr"] == asr["merged"]["metrics"]["wer"]
        # Lower is better for WER: interference is reference minus merged.
        assert evaluation["interference_delta"]["asr"] == pytest.approx(
            asr["reference"]["primary"] - asr["merged"]["primary"])
        assert evaluation["interference_delta"]["intent"] == pytest.approx(
            intent["merged"]["primary"] - intent["reference"]["primary"])

        answer = client.post("/merges", json={
            "adapters": ["asr", "intent"], "method": "weighted_delta", "eval_tasks": ["asr", "intent"],
            "optimizer": {"name": "adamerging", "params": {"steps": 2, "batch_size": 2, "split": "train"}}})
        assert answer.status_code == 202, answer.text
        job = wait_job(client, answer.json()["id"])
        assert job["status"] == "succeeded", job["error"]
        learned = json.loads((Path(job["result"]["run_dir"]) / "adamerging_lambdas.json").read_text())
        assert learned["tasks"] == ["asr", "intent"] and len(learned["entropy"]) == 2


def test_a_merge_of_the_two_adapters_applies_and_restores(session: EvalSession) -> None:
    before = session.holder.weights_fingerprint()
    merged = run_merge({"adapters": ["asr", "intent"], "method": "uniform"},
                       task_registry=session.workspace.task_registry(), artifacts_dir=session.root)
    result = session.evaluate_merge(merged.output, merge_tag=merged.merge_tag)
    assert set(result.tasks) == {"asr", "intent"}
    after = session.holder.weights_fingerprint()
    assert all(torch.equal(before[k], after[k]) for k in before)
