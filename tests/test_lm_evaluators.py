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


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shared_prompt_label_scores_equal_one_sequence_per_label(llama_base: Path, attention: str) -> None:
    """Each prompt computed once (its labels packed behind its cache) gives the scores of one
    forward pass per prompt + label sequence, to 1e-4 in log-probability, for prompts and labels
    of different lengths, under both attention implementations."""
    from merging_core.evaluation.evaluators import label_scores

    model = LlamaForCausalLM.from_pretrained(llama_base, attn_implementation=attention).eval()
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 64, (length,), generator=generator).tolist() for length in (5, 1, 9, 3)]
    labels = [torch.randint(3, 64, (length,), generator=generator).tolist() for length in (1, 3, 2, 4, 1)]
    with torch.inference_mode():
        shared = label_scores(model, prompts, labels, pad_id=0, device=torch.device("cpu"))
        expected = torch.zeros(len(prompts), len(labels))
        for i, prompt in enumerate(prompts):
            for j, label in enumerate(labels):
                logits = model(input_ids=torch.tensor([prompt + label])).logits.float()
                log_probs = torch.log_softmax(logits[0], dim=-1)
                expected[i, j] = sum(log_probs[len(prompt) + k - 1, token] for k, token in enumerate(label))
    assert shared.shape == (len(prompts), len(labels))
    torch.testing.assert_close(shared, expected, atol=1e-4, rtol=0)


def _templated_workspace(lm_workspace: Path, target: Path, **settings: object) -> Path:
    """The tiny LM workspace with the `pick` task's prompts written by a template."""
    spec = yaml.safe_load(lm_workspace.read_text())
    spec["base_model"]["path"] = str(lm_workspace.parent / "base")
    for task in spec["tasks"].values():
        task["data"] = {split: str(lm_workspace.parent / path) for split, path in task["data"].items()}
    spec["tasks"]["pick"].update(settings)
    target.mkdir(parents=True, exist_ok=True)
    (target / "workspace.yaml").write_text(yaml.safe_dump(spec))
    return target / "workspace.yaml"


def test_prompt_template_and_label_prefix(lm_workspace: Path, lm_session: EvalSession, tmp_path: Path) -> None:
    """The rendered prompt is what is scored, with `label_prefix` before each label; a template
    naming a missing column is an error naming the column and the row."""
    from merging_core.errors import ConfigError

    template = "{text} sky sea"
    workspace = load_workspace(_templated_workspace(lm_workspace, tmp_path / "ws", prompt_template=template,
                                                    label_prefix=""))
    session = EvalSession(workspace, lm_session.holder, tmp_path / "artifacts")
    data = session.split_data("pick", "test")
    assert data.texts == [template.format(**row) for row in _rows(lm_workspace, "pick")]
    tokenizer, model = session.holder.tokenizer, session.holder.model
    metrics = session.evaluate_output(session.task_output("pick"), ["pick"], "test", None)["pick"]
    correct = 0
    with session.holder.applied(session.task_output("pick")), torch.inference_mode():
        for text, label in zip(data.texts, data.labels or []):
            prompt = tokenizer(text)["input_ids"]
            scores = []
            for candidate in LABELS:
                ids = tokenizer(candidate, add_special_tokens=False)["input_ids"]  # label_prefix ""
                log_probs = torch.log_softmax(model(input_ids=torch.tensor([prompt + ids])).logits[0], -1)
                scores.append(sum(float(log_probs[len(prompt) - 1 + k, t]) for k, t in enumerate(ids)))
            correct += LABELS[scores.index(max(scores))] == label
    assert metrics.primary == pytest.approx(correct / 10)
    missing = load_workspace(_templated_workspace(lm_workspace, tmp_path / "bad", prompt_template="{text} {topic}"))
    with pytest.raises(ConfigError, match="names column 'topic', which row 1 lacks"):
        EvalSession(missing, lm_session.holder, tmp_path / "artifacts").split_data("pick", "test")


def test_templated_lm_task_through_the_service(lm_workspace: Path, tmp_path: Path) -> None:
    from app.settings import Settings
    from tests.service_helpers import thread_server, wait_job

    workspace = _templated_workspace(lm_workspace, tmp_path / "ws", prompt_template="{text} sky sea")
    with thread_server(Settings(workspace=workspace, artifacts_dir=tmp_path / "artifacts")) as (client, _):
        job = client.post("/merges", json={"adapters": ["pick", "echo"], "method": "task_vector",
                                           "method_params": {"lambda": 0.5}, "eval_tasks": ["pick"]})
        assert job.status_code == 202, job.text
        done = wait_job(client, job.json()["id"])
        assert done["status"] == "succeeded", done["error"]
        assert set(done["result"]["evaluation"]["metrics"]) == {"pick"}


def test_adamerging_entropy_on_label_scoring_matches_a_direct_computation(lm_session: EvalSession,
                                                                         lm_workspace: Path) -> None:
    """AdaMerging's objective on a label-scoring task is the entropy of the softmax over the
    labels' log-likelihoods, each computed here as its own prompt + label sequence."""
    tokenizer, model, holder = lm_session.holder.tokenizer, lm_session.holder.model, lm_session.holder
    texts = [row["text"] for row in _rows(lm_workspace, "pick")]
    with holder.applied(lm_session.task_output("pick")), torch.no_grad():
        entropy = lm_session.prediction_entropy("pick", texts, holder)
        expected = []
        for text in texts:
            prompt = tokenizer(text)["input_ids"]
            scores = []
            for label in LABELS:
                ids = tokenizer(" " + label, add_special_tokens=False)["input_ids"]
                log_probs = torch.log_softmax(model(input_ids=torch.tensor([prompt + ids])).logits[0].float(), -1)
                scores.append(sum(log_probs[len(prompt) - 1 + k, t] for k, t in enumerate(ids)))
            distribution = torch.log_softmax(torch.stack(scores), dim=0)
            expected.append(-(distribution.exp() * distribution).sum())
    assert float(entropy) == pytest.approx(float(torch.stack(expected).mean()), abs=1e-5)


def test_adamerging_entropy_on_generation_is_over_the_greedy_continuation(lm_session: EvalSession,
                                                                           lm_workspace: Path) -> None:
    """On a generation task: the mean next-token entropy over the model's own greedy
    continuation (the task's max_new_tokens, through the first end-of-text), pooled over tokens."""
    tokenizer, model, holder = lm_session.holder.tokenizer, lm_session.holder.model, lm_session.holder
    texts = [row["text"] for row in _rows(lm_workspace, "echo")]
    with holder.applied(lm_session.task_output("echo")), torch.no_grad():
        entropy = lm_session.prediction_entropy("echo", texts, holder)
        per_token = []
        for text in texts:
            prompt = tokenizer(text, return_tensors="pt")["input_ids"]
            out = model.generate(input_ids=prompt, max_new_tokens=3, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            continuation = out[0, prompt.shape[1]:].tolist()
            if tokenizer.eos_token_id in continuation:
                continuation = continuation[: continuation.index(tokenizer.eos_token_id) + 1]
            sequence = torch.tensor([prompt[0].tolist() + continuation])
            log_probs = torch.log_softmax(model(input_ids=sequence).logits[0].float(), -1)
            for k in range(len(continuation)):
                row = log_probs[prompt.shape[1] - 1 + k]
                per_token.append(-(row.exp() * row).sum())
    assert float(entropy) == pytest.approx(float(torch.stack(per_token).mean()), abs=1e-5)


def test_adamerging_on_lm_tasks_through_the_service(lm_workspace: Path, tmp_path: Path) -> None:
    """AdaMerging learns per-layer lambdas on a label-scoring and a generation task together,
    through uvicorn: progress shows its steps, the bundle has the learned lambdas."""
    from app.settings import Settings
    from tests.service_helpers import thread_server, wait_job

    with thread_server(Settings(workspace=lm_workspace, artifacts_dir=tmp_path / "artifacts")) as (client, _):
        job = client.post("/merges", json={
            "adapters": ["pick", "echo"], "method": "task_vector", "eval_tasks": ["pick"],
            "optimizer": {"name": "adamerging", "params": {"steps": 3, "batch_size": 4, "split": "test",
                                                           "lr": 0.05}}})
        assert job.status_code == 202, job.text
        done = wait_job(client, job.json()["id"])
        assert done["status"] == "succeeded", done["error"]
        learned = json.loads((Path(done["run_dir"]) / "adamerging_lambdas.json").read_text())
        assert len(learned["entropy"]) == 3 and all(value == value for value in learned["entropy"])
        assert learned["lambdas"] and any(value != 0.3 for values in learned["lambdas"].values() for value in values)


CHAT = "{% for m in messages %}sky {{ m['content'] }} sea{% endfor %}{% if add_generation_prompt %} tree{% endif %}"


def test_chat_template_prompts_and_their_default_label_prefix(lm_workspace: Path, lm_session: EvalSession,
                                                              tmp_path: Path) -> None:
    """With `chat_template: true` the rendered chat turn is scored (no special tokens added
    twice) and each label is scored with the default prefix "" after it."""
    from transformers import AutoTokenizer

    base = tmp_path / "chat_base"
    LlamaForCausalLM.from_pretrained(lm_workspace.parent / "base").save_pretrained(base)
    tokenizer = AutoTokenizer.from_pretrained(lm_workspace.parent / "base")
    tokenizer.chat_template = CHAT
    tokenizer.save_pretrained(base)
    spec_path = _templated_workspace(lm_workspace, tmp_path / "ws", chat_template=True)
    spec = yaml.safe_load(spec_path.read_text())
    spec["base_model"]["path"] = str(base)
    spec_path.write_text(yaml.safe_dump(spec))
    session = EvalSession.from_workspace(load_workspace(spec_path), tmp_path / "artifacts")
    assert session.workspace.task("pick").effective_label_prefix == ""
    tokenizer, model = session.holder.tokenizer, session.holder.model
    metrics = session.evaluate_output(session.task_output("pick"), ["pick"], "test", None)["pick"]
    correct = 0
    with session.holder.applied(session.task_output("pick")), torch.inference_mode():
        for row in _rows(lm_workspace, "pick"):
            prompt = tokenizer(f"sky {row['text']} sea tree", add_special_tokens=False)["input_ids"]
            scores = []
            for candidate in LABELS:
                ids = tokenizer(candidate, add_special_tokens=False)["input_ids"]
                log_probs = torch.log_softmax(model(input_ids=torch.tensor([prompt + ids])).logits[0], -1)
                scores.append(sum(float(log_probs[len(prompt) - 1 + k, t]) for k, t in enumerate(ids)))
            correct += LABELS[scores.index(max(scores))] == row["label"]
    assert metrics.primary == pytest.approx(correct / 10)


def test_a_long_prompt_keeps_its_end(lm_session: EvalSession) -> None:
    """The template's cue is at the prompt's end, so truncation to max_length keeps the end."""
    from merging_core.evaluation.evaluators import prompt_ids

    task = lm_session.workspace.task("pick")  # max_length 16
    text = " ".join(["red"] * 30 + ["sky", "sea"])
    ids = prompt_ids(lm_session.holder.tokenizer, task, text)
    assert len(ids) == 16
    assert lm_session.holder.tokenizer.decode(ids[-2:]) == "sky sea"


@pytest.mark.parametrize("template", ["{text.upper}", "{text[0]}", "{}", "no column"])
def test_templates_name_plain_columns(template: str) -> None:
    from merging_core.evaluation.workspace import TaskConfig

    with pytest.raises(ValueError, match="prompt_template"):
        TaskConfig(adapter="a", data={"test": "x.jsonl"}, prompt_template=template)
