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
from merging_core.plugins.optimizer_base import mean_entropy
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
    # A chat template brings its own special tokens; adding them again would double the BOS.
    return ctx.holder.encode(texts, ctx.task.max_length, add_special_tokens=not ctx.task.chat_template)


def _chat(ctx: EvalContext, prompt: str) -> str:
    return render_prompt(ctx.holder.tokenizer, ctx.task, prompt)


def render_prompt(tokenizer: Any, task: TaskConfig, prompt: str) -> str:
    """The prompt as a user turn in the tokenizer's chat template, the generation prompt added
    (the prompt itself with `chat_template: false`)."""
    if not task.chat_template:
        return prompt
    return str(tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False))


def prompt_ids(tokenizer: Any, task: TaskConfig, prompt: str) -> list[int]:
    """A prompt's token ids as label scoring sees them: rendered (a chat template brings its
    own special tokens, so none are added to it); a prompt longer than `max_length` keeps its
    last `max_length` tokens, because a template's cue ("...\nIntent:", the assistant turn)
    is at its end."""
    ids = list(tokenizer(render_prompt(tokenizer, task, prompt), add_special_tokens=not task.chat_template,
                         verbose=False)["input_ids"])
    return ids[-task.max_length:]


def label_token_ids(tokenizer: Any, task: TaskConfig, labels: Sequence[str]) -> list[list[int]]:
    """Each label's ids: `label_prefix + label` tokenized on its own, no special tokens."""
    ids = [list(tokenizer(task.effective_label_prefix + label, add_special_tokens=False)["input_ids"])
           for label in labels]
    empty = [label for label, tokens in zip(labels, ids) if not tokens]
    if empty:
        raise EvaluationError(f"label(s) {empty} tokenize to no tokens; label scoring needs at least one")
    return ids


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


def label_scores(model: Any, prompts: Sequence[Sequence[int]], label_ids: Sequence[Sequence[int]],
                 pad_id: int, device: torch.device) -> torch.Tensor:
    """log P(label | prompt) for every (prompt, label) pair, each prompt computed once.

    The prompts run once, left-padded, with a key/value cache (`DynamicCache`). Then every
    label's tokens, packed one after another into one row per prompt, run against that cache
    with a 4D attention mask: each label token sees its prompt and the earlier tokens of its own
    label, never another label, and its position continues from the prompt's end. Packing wastes
    nothing on padding and never copies the cache. The first label token is scored from the
    prompt's last logits, the rest from the label pass. Equal to one forward pass per
    (prompt + label) sequence, to float precision. Returns [prompts, labels].
    """
    from transformers import DynamicCache

    n_prompts, n_labels = len(prompts), len(label_ids)
    width = max(len(p) for p in prompts)
    prompt_ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=device)
    prompt_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    prompt_positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    # Only the last prompt position's logits are needed (the first label token's score).
    if width > 1:
        model(input_ids=prompt_ids[:, :-1], attention_mask=prompt_mask[:, :-1],
              position_ids=prompt_positions[:, :-1], cache=cache, use_cache=True, logits_to_keep=1)
    out = model(input_ids=prompt_ids[:, -1:], attention_mask=prompt_mask, position_ids=prompt_positions[:, -1:],
                cache=cache, use_cache=True)
    first = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)  # [prompts, vocab]
    starts = [0]
    for ids in label_ids:
        starts.append(starts[-1] + len(ids))
    packed = torch.tensor([token for ids in label_ids for token in ids], device=device)  # [T]
    scores = first[:, packed[starts[:-1]]]  # [prompts, labels]: each label's first token
    if starts[-1] == n_labels:  # every label is one token
        return scores
    total = starts[-1]
    owner = torch.repeat_interleave(torch.arange(n_labels, device=device),
                                    torch.tensor([len(ids) for ids in label_ids], device=device))  # [T]
    offset = torch.arange(total, device=device) - torch.tensor(starts[:-1], device=device)[owner]
    # Label token q sees label token k when both belong to one label and k is not after q.
    among = (owner[:, None] == owner[None, :]) & (offset[:, None] >= offset[None, :])  # [T, T]
    sees = torch.cat([prompt_mask.bool()[:, None, :].expand(n_prompts, total, width),
                      among[None].expand(n_prompts, total, total)], dim=2)[:, None]  # [prompts, 1, T, width+T]
    dtype = next(model.parameters()).dtype
    mask = torch.zeros(sees.shape, dtype=dtype, device=device).masked_fill(~sees, torch.finfo(dtype).min)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    inputs = {"input_ids": packed.expand(n_prompts, total), "attention_mask": mask, "cache": cache,
              "use_cache": True, "position_ids": lengths[:, None] + offset[None, :]}
    # A packed token predicts the next token of its own label unless it is its label's last.
    scored = torch.ones(total, dtype=torch.bool, device=device)
    scored[torch.tensor(starts[1:], device=device) - 1] = False
    targets = packed[1:][scored[:-1]]  # [S]: the tokens predicted at the scored positions
    if _plain_output_layer(model):
        # The output layer (the whole vocabulary) only where a label token is predicted: at many
        # labels it is most of the work.
        hidden = model.get_decoder()(**inputs).last_hidden_state[:, scored]  # [prompts, S, hidden]
        logits = model.get_output_embeddings()(hidden).float()
    else:
        logits = model(**inputs).logits[:, scored].float()  # [prompts, S, vocab]
    # log-softmax at the targets only: logit - logsumexp (no second [.., vocab] copy)
    picked = logits.gather(2, targets.expand(n_prompts, -1)[:, :, None]).squeeze(2) - torch.logsumexp(logits, -1)
    later = torch.zeros(n_prompts, n_labels, dtype=picked.dtype, device=device)
    later.index_add_(1, owner[scored], picked)
    return scores + later


def _plain_output_layer(model: Any) -> bool:
    """Whether logits are just the output layer applied to the decoder's last hidden states (no
    soft-capping or scaling after it), so it may be applied at chosen positions only."""
    config = model.config
    return (hasattr(model, "get_decoder") and model.get_output_embeddings() is not None
            and getattr(config, "final_logit_softcapping", None) is None
            and getattr(config, "logit_scale", None) in (None, 1.0))


def causal_lm_label_scoring(ctx: EvalContext) -> tuple[dict[str, float], dict[str, dict[str, int]]]:
    """Score each label's text as a continuation of the input; pick the most likely.

    Tokens: the prompt's ids (truncated to `max_length`), then the ids of `label_prefix + label`
    tokenized on its own. Each prompt is computed once for all labels (`label_scores`)."""
    gold = _require_labels(ctx)
    tokenizer = ctx.holder.tokenizer
    label_ids = label_token_ids(tokenizer, ctx.task, ctx.labels)
    predictions: list[str] = [""] * len(ctx.data)
    # A batch holds about batch_size sequences' worth of label rows, as before.
    batches = length_sorted_batches(ctx.data.texts, max(1, ctx.task.batch_size // len(ctx.labels)))
    pad = tokenizer.pad_token_id or 0
    with torch.inference_mode():
        for done, batch in enumerate(batches, start=1):
            check(ctx.cancel)
            prompts = [prompt_ids(tokenizer, ctx.task, ctx.data.texts[index]) for index in batch]
            per_example = label_scores(ctx.holder.model, prompts, label_ids, pad, ctx.holder.device)
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
        # Left padding for generation; a long prompt keeps its end (see `prompt_ids`).
        tokenizer.padding_side = "left"
        tokenizer.truncation_side = "left"
    with torch.inference_mode():
        for done, batch in enumerate(batches, start=1):
            check(ctx.cancel)
            encoded = _encode(ctx, [_chat(ctx, ctx.data.texts[i]) for i in batch])
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


# --- AdaMerging's objective: the entropy of the model's own predictions on unlabeled inputs ----
# Each takes the holder (with whatever is applied or hooked now), the task's settings, a batch
# of its inputs and its labels, and returns a differentiable scalar.


def _encoded(holder: Any, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    encoded = holder.tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                               return_tensors="pt")
    return {name: tensor.to(holder.device) for name, tensor in encoded.items()}


def head_entropy(holder: Any, task: TaskConfig, texts: Sequence[str], labels: Sequence[str]) -> torch.Tensor:
    """Mean entropy of the task's classification head over its classes."""
    return mean_entropy(holder.model(**_encoded(holder, texts, task.max_length)).logits)


def label_entropy(holder: Any, task: TaskConfig, texts: Sequence[str], labels: Sequence[str]) -> torch.Tensor:
    """Mean entropy of the softmax over the labels' log-likelihoods (`label_scores`: each prompt
    computed once), i.e. of the label distribution the evaluator takes its argmax of."""
    tokenizer = holder.tokenizer
    scores = label_scores(holder.model, [prompt_ids(tokenizer, task, text) for text in texts],
                          label_token_ids(tokenizer, task, labels), tokenizer.pad_token_id or 0, holder.device)
    return mean_entropy(scores)


def generation_entropy(holder: Any, task: TaskConfig, texts: Sequence[str], labels: Sequence[str]) -> torch.Tensor:
    """Mean next-token entropy over the model's own greedy continuation of each prompt: up to
    the task's `max_new_tokens` tokens, through the first end-of-text, generated without
    gradients, then scored in one differentiable pass. Causal LMs only."""
    if getattr(holder, "model_class", "causal_lm") != "causal_lm":
        raise EvaluationError("generation entropy (AdaMerging on generation tasks) needs a causal LM")
    tokenizer, model, device = holder.tokenizer, holder.model, holder.device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prompts = [prompt_ids(tokenizer, task, text) for text in texts]
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    prompt_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    with torch.no_grad():
        generated = model.generate(input_ids=input_ids, attention_mask=prompt_mask, do_sample=False,
                                   max_new_tokens=task.max_new_tokens, pad_token_id=pad)
    continuation = generated[:, width:]
    if continuation.shape[1] == 0:
        raise EvaluationError("generation entropy: the model generated no token")
    # Keep each continuation through its first end-of-text token; what follows is padding.
    eos = tokenizer.eos_token_id
    is_eos = (continuation == eos).long() if eos is not None else torch.zeros_like(continuation)
    keep = (is_eos.cumsum(dim=1) - is_eos) == 0  # no end-of-text before this token
    mask = torch.cat([prompt_mask, keep.long()], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=generated, attention_mask=mask, position_ids=positions).logits
    predicting = logits[:, width - 1 : -1].float()  # position t predicts continuation token t
    log_probs = torch.log_softmax(predicting, dim=-1)
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)  # [prompts, new tokens]
    return (entropy * keep).sum() / keep.sum().clamp(min=1)


@dataclass(frozen=True)
class Evaluator:
    name: str
    doc: str
    metrics: dict[str, Literal["higher", "lower"]]
    run: Callable[[EvalContext], tuple[dict[str, float], dict[str, dict[str, int]]]]
    needs_labels: bool = True
    # AdaMerging's objective on this evaluator's tasks: (holder, task, texts, labels) -> scalar
    entropy: Callable[[Any, TaskConfig, Sequence[str], Sequence[str]], torch.Tensor] | None = None

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
            entropy=head_entropy,
        ),
        Evaluator(
            "causal_lm_label_scoring",
            "label with the highest log-likelihood as a continuation of the input",
            {"accuracy": "higher", "macro_f1": "higher"},
            causal_lm_label_scoring,
            entropy=label_entropy,
        ),
        Evaluator(
            "generation",
            "greedy decoding compared with the reference",
            {"exact_match": "higher", "wer": "lower", "cer": "lower"},
            generation,
            needs_labels=False,
            entropy=generation_entropy,
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
