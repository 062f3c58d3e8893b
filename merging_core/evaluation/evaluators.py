"""Evaluators: a registry, like the methods. Each turns (model, task data) into metrics.

- `sequence_classification`: argmax of the task head; accuracy, macro-F1, per-class counts.
- `causal_lm_label_scoring`: the label whose text has the highest log-likelihood after the
  input; accuracy, macro-F1, per-class counts.
- `generation`: greedy decoding; exact match, and WER/CER (jiwer) for ASR-like tasks.
Inputs are batched in length order (less padding) under `torch.inference_mode()`, and the cancel
token is checked between batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from merging_core.errors import EvaluationError, UnknownMethodError
from merging_core.runtime.cancel import CancelToken, Progress, check, report
from merging_core.evaluation.data import TaskData
from merging_core.evaluation.holder import ModelHolder
from merging_core.evaluation.workspace import TaskConfig


@dataclass
class EvalMetrics:
    """What one evaluation of one task produced."""

    primary_metric: str
    direction: Literal["higher", "lower"]
    metrics: dict[str, float]
    num_samples: int
    per_class: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def primary(self) -> float:
        return self.metrics[self.primary_metric]

    def to_dict(self) -> dict[str, Any]:
        return {
            "primary_metric": self.primary_metric,
            "direction": self.direction,
            "primary": self.primary,
            "metrics": self.metrics,
            "num_samples": self.num_samples,
            "per_class": self.per_class,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalMetrics:
        return cls(
            primary_metric=data["primary_metric"],
            direction=data["direction"],
            metrics=data["metrics"],
            num_samples=data["num_samples"],
            per_class=data.get("per_class", {}),
        )


@dataclass
class EvalContext:
    holder: ModelHolder
    task: TaskConfig
    data: TaskData
    labels: list[str]
    cancel: CancelToken | None = None
    progress: Progress | None = None


def length_sorted_batches(texts: Sequence[str], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def classification_metrics(
    predictions: Sequence[str], labels: Sequence[str], label_names: Sequence[str]
) -> tuple[dict[str, float], dict[str, dict[str, int]]]:
    per_class = {name: {"support": 0, "correct": 0, "predicted": 0} for name in label_names}
    for predicted, gold in zip(predictions, labels):
        per_class.setdefault(gold, {"support": 0, "correct": 0, "predicted": 0})["support"] += 1
        per_class.setdefault(predicted, {"support": 0, "correct": 0, "predicted": 0})["predicted"] += 1
        if predicted == gold:
            per_class[gold]["correct"] += 1
    f1s = []
    for counts in per_class.values():
        if counts["support"] == 0:
            continue
        precision = counts["correct"] / counts["predicted"] if counts["predicted"] else 0.0
        recall = counts["correct"] / counts["support"]
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    correct = sum(c["correct"] for c in per_class.values())
    metrics = {
        "accuracy": correct / len(labels) if labels else 0.0,
        "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0,
    }
    return metrics, per_class


def _encode(ctx: EvalContext, texts: list[str]) -> dict[str, torch.Tensor]:
    return ctx.holder.encode(texts, ctx.task.max_length)


def _require_labels(ctx: EvalContext) -> list[str]:
    if ctx.data.labels is None:
        raise EvaluationError(f"evaluator {ctx.task.evaluator!r} needs a label column")
    return ctx.data.labels


def sequence_classification(ctx: EvalContext) -> tuple[dict[str, float], dict[str, dict[str, int]]]:
    gold = _require_labels(ctx)
    predictions: list[str] = [""] * len(ctx.data)
    batches = length_sorted_batches(ctx.data.texts, ctx.task.batch_size)
    with torch.inference_mode():
        for done, batch in enumerate(batches, start=1):
            check(ctx.cancel)
            logits = ctx.holder.model(**_encode(ctx, [ctx.data.texts[i] for i in batch])).logits
            if logits.shape[-1] != len(ctx.labels):
                raise EvaluationError(
                    f"the head has {logits.shape[-1]} outputs but the task has {len(ctx.labels)} labels"
                )
            for index, label_id in zip(batch, logits.argmax(dim=-1).tolist()):
                predictions[index] = ctx.labels[label_id]
            report(ctx.progress, done, len(batches), "batch")
    return classification_metrics(predictions, gold, ctx.labels)


def causal_lm_label_scoring(ctx: EvalContext) -> tuple[dict[str, float], dict[str, dict[str, int]]]:
    """Score each label's text as a continuation of the input; pick the most likely."""
    gold = _require_labels(ctx)
    tokenizer = ctx.holder.tokenizer
    label_ids = [tokenizer(" " + label, add_special_tokens=False)["input_ids"] for label in ctx.labels]
    predictions: list[str] = [""] * len(ctx.data)
    batches = length_sorted_batches(ctx.data.texts, max(1, ctx.task.batch_size // len(ctx.labels)))
    with torch.inference_mode():
        for done, batch in enumerate(batches, start=1):
            check(ctx.cancel)
            sequences, spans = [], []
            for index in batch:
                prompt = tokenizer(ctx.data.texts[index], truncation=True,
                                   max_length=ctx.task.max_length)["input_ids"]
                for ids in label_ids:
                    sequences.append(prompt + ids)
                    spans.append((len(prompt), len(ids)))
            width = max(len(s) for s in sequences)
            pad = tokenizer.pad_token_id or 0
            input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences])
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
            logits = ctx.holder.model(
                input_ids=input_ids.to(ctx.holder.device), attention_mask=mask.to(ctx.holder.device)
            ).logits.float()
            log_probs = torch.log_softmax(logits, dim=-1)
            scores = []
            for row, (start, length) in enumerate(spans):
                positions = torch.arange(start - 1, start + length - 1, device=log_probs.device)
                targets = input_ids[row, start : start + length].to(log_probs.device)
                scores.append(float(log_probs[row, positions, targets].sum()))
            per_example = torch.tensor(scores).view(len(batch), len(ctx.labels))
            for index, label_id in zip(batch, per_example.argmax(dim=-1).tolist()):
                predictions[index] = ctx.labels[label_id]
            report(ctx.progress, done, len(batches), "batch")
    return classification_metrics(predictions, gold, ctx.labels)


def _normalise(text: str) -> str:
    return " ".join(text.lower().strip().split())


def generation(ctx: EvalContext) -> tuple[dict[str, float], dict[str, dict[str, int]]]:
    import jiwer

    references = ctx.data.references or ctx.data.labels
    if references is None:
        raise EvaluationError("evaluator 'generation' needs a reference (or label) column")
    tokenizer = ctx.holder.tokenizer
    outputs: list[str] = [""] * len(ctx.data)
    batches = length_sorted_batches(ctx.data.texts, ctx.task.batch_size)
    is_causal = ctx.holder.model_class == "causal_lm"
    if is_causal:
        tokenizer.padding_side = "left"
    with torch.inference_mode():
        for done, batch in enumerate(batches, start=1):
            check(ctx.cancel)
            encoded = _encode(ctx, [ctx.data.texts[i] for i in batch])
            generated = ctx.holder.model.generate(
                **encoded, max_new_tokens=ctx.task.max_new_tokens, do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            if is_causal:
                generated = generated[:, encoded["input_ids"].shape[1] :]
            for index, text in zip(batch, tokenizer.batch_decode(generated, skip_special_tokens=True)):
                outputs[index] = text
            report(ctx.progress, done, len(batches), "batch")
    hypotheses = [_normalise(o) for o in outputs]
    golds = [_normalise(r) for r in references]
    exact = sum(h == g for h, g in zip(hypotheses, golds)) / len(golds)
    # jiwer refuses empty references; score an empty reference as a word-level "" vs hypothesis.
    safe_golds = [g or "<empty>" for g in golds]
    safe_hyps = [h or "<empty>" for h in hypotheses]
    metrics = {
        "exact_match": exact,
        "wer": float(jiwer.wer(safe_golds, safe_hyps)),
        "cer": float(jiwer.cer(safe_golds, safe_hyps)),
    }
    return metrics, {}


@dataclass(frozen=True)
class Evaluator:
    name: str
    doc: str
    metrics: dict[str, Literal["higher", "lower"]]
    run: Callable[[EvalContext], tuple[dict[str, float], dict[str, dict[str, int]]]]
    needs_labels: bool = True

    def evaluate(self, ctx: EvalContext) -> EvalMetrics:
        if ctx.task.primary_metric not in self.metrics:
            raise EvaluationError(
                f"evaluator {self.name!r} has no metric {ctx.task.primary_metric!r}; "
                f"it has: {', '.join(self.metrics)}"
            )
        metrics, per_class = self.run(ctx)
        return EvalMetrics(
            primary_metric=ctx.task.primary_metric,
            direction=ctx.task.direction or self.metrics[ctx.task.primary_metric],
            metrics=metrics,
            num_samples=len(ctx.data),
            per_class=per_class,
        )


EVALUATORS: dict[str, Evaluator] = {
    e.name: e
    for e in (
        Evaluator(
            "sequence_classification",
            "argmax of the task's classification head",
            {"accuracy": "higher", "macro_f1": "higher"},
            sequence_classification,
        ),
        Evaluator(
            "causal_lm_label_scoring",
            "label with the highest log-likelihood as a continuation of the input",
            {"accuracy": "higher", "macro_f1": "higher"},
            causal_lm_label_scoring,
        ),
        Evaluator(
            "generation",
            "greedy decoding compared with the reference",
            {"exact_match": "higher", "wer": "lower", "cer": "lower"},
            generation,
            needs_labels=False,
        ),
    )
}


def get_evaluator(name: str) -> Evaluator:
    try:
        return EVALUATORS[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown evaluator {name!r}; available: {', '.join(sorted(EVALUATORS))}"
        ) from None
