"""The causal-LM evaluators on a tiny Llama with a word-level tokenizer: label scoring and
generation (exact match, WER/CER: lower is better), checked against unbatched computations, and
the interference sign of a lower-is-better metric through `evaluate_merge`."""

from __future__ import annotations

import json
import random
from pathlib import Path

import jiwer
import pytest
import torch
import yaml
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from merging_core import run_merge
from merging_core.evaluation.evaluate import EvalSession
from merging_core.evaluation.workspace import load_workspace

WORDS = ["yes", "no", "red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "sky", "sea"]
LABELS = ["yes", "no"]


def _tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[EOS]", *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]",
                                   eos_token="[EOS]")


@pytest.fixture(scope="module")
def lm_workspace(llama_base: Path, make_adapter, tmp_path_factory: pytest.TempPathFactory) -> Path:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("lm_workspace")
    base = root / "base"
    LlamaForCausalLM.from_pretrained(llama_base).save_pretrained(base)
    _tokenizer().save_pretrained(base)
    rng = random.Random(0)
    rows = {"pick": [], "echo": []}
    for _ in range(10):
        text = " ".join(rng.choice(WORDS[2:]) for _ in range(rng.randint(2, 6)))
        rows["pick"].append({"text": text, "label": rng.choice(LABELS)})
        rows["echo"].append({"text": text, "reference": " ".join(text.split()[:2])})
    tasks = {}
    for seed, (task, evaluator, metric) in enumerate(
        [("pick", "causal_lm_label_scoring", "accuracy"), ("echo", "generation", "wer")], start=1
    ):
        (root / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[task]))
        adapter = make_adapter(f"lm_{task}", base=base, seed=seed)
        tasks[task] = {"adapter": str(adapter), "data": {"test": f"{task}.jsonl"}, "evaluator": evaluator,
                       "primary_metric": metric, "batch_size": 4, "max_length": 16, "max_new_tokens": 3,
                       **({"labels": LABELS} if task == "pick" else {})}
    spec = {"name": "tiny-lm", "base_model": {"path": "base", "model_class": "causal_lm", "device": "cpu"},
            "tasks": tasks}
    (root / "workspace.yaml").write_text(yaml.safe_dump(spec))
    return root / "workspace.yaml"


@pytest.fixture(scope="module")
def lm_session(lm_workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> EvalSession:
    return EvalSession.from_workspace(load_workspace(lm_workspace), tmp_path_factory.mktemp("lm_artifacts"))


def _rows(workspace: Path, task: str) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in (workspace.parent / f"{task}.jsonl").read_text().splitlines()]


def test_label_scoring_matches_one_example_at_a_time(lm_session: EvalSession, lm_workspace: Path) -> None:
    tokenizer, model = lm_session.holder.tokenizer, lm_session.holder.model
    metrics = lm_session.evaluate_output(lm_session.task_output("pick"), ["pick"], "test", None)["pick"]
    correct = 0
    with lm_session.holder.applied(lm_session.task_output("pick")), torch.inference_mode():
        for row in _rows(lm_workspace, "pick"):
            prompt = tokenizer(row["text"])["input_ids"]
            scores = []
            for label in LABELS:
                ids = tokenizer(" " + label, add_special_tokens=False)["input_ids"]
                log_probs = torch.log_softmax(model(input_ids=torch.tensor([prompt + ids])).logits[0], -1)
                scores.append(sum(float(log_probs[len(prompt) - 1 + k, t]) for k, t in enumerate(ids)))
            correct += LABELS[scores.index(max(scores))] == row["label"]
    assert metrics.primary == pytest.approx(correct / 10)
    assert set(metrics.metrics) == {"accuracy", "macro_f1"} and metrics.direction == "higher"


def test_generation_matches_one_example_at_a_time(lm_session: EvalSession, lm_workspace: Path) -> None:
    tokenizer, model = lm_session.holder.tokenizer, lm_session.holder.model
    metrics = lm_session.evaluate_output(lm_session.task_output("echo"), ["echo"], "test", None)["echo"]
    hypotheses, references = [], []
    with lm_session.holder.applied(lm_session.task_output("echo")), torch.inference_mode():
        for row in _rows(lm_workspace, "echo"):
            inputs = tokenizer(row["text"], return_tensors="pt")
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            text = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            hypotheses.append(" ".join(text.lower().split()) or "<empty>")
            references.append(row["reference"])
    assert metrics.direction == "lower" and metrics.primary == metrics.metrics["wer"]
    assert metrics.metrics["wer"] == pytest.approx(jiwer.wer(references, hypotheses))
    assert metrics.metrics["exact_match"] == pytest.approx(
        sum(h == r for h, r in zip(hypotheses, references)) / len(references))


def test_interference_is_signed_for_a_lower_is_better_metric(lm_session: EvalSession) -> None:
    merged = run_merge({"adapters": ["pick", "echo"], "method": "uniform"},
                       task_registry=lm_session.workspace.task_registry(), artifacts_dir=lm_session.root)
    result = lm_session.evaluate_merge(merged.output, merge_tag=merged.merge_tag)
    echo = result.tasks["echo"]
    assert echo.merged.direction == "lower"
    assert echo.interference_delta == pytest.approx(echo.reference.primary - echo.merged.primary)
    pick = result.tasks["pick"]
    assert pick.interference_delta == pytest.approx(pick.merged.primary - pick.reference.primary)
    assert result.objective == pytest.approx(min(echo.interference_delta, pick.interference_delta))
