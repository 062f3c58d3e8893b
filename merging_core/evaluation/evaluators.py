"""Evaluators: a registry, like the methods. Each turns (model, task data) into metrics.

- `sequence_classification`: argmax of the task head; accuracy, macro-F1, per-class counts.
- `causal_lm_label_scoring`: the label whose text has the highest log-likelihood after the
  input; accuracy, macro-F1, per-class counts.
- `generation`: greedy decoding; exact match, and WER/CER (jiwer) for ASR-like tasks.
- `speech_recognition` (audio): greedy transcription; WER, CER and exact match (jiwer) after
  Whisper's basic text normalizer.
- `seq2seq_label_scoring` (audio): the label whose text, then end-of-text, is most likely under
  the decoder given the clip; accuracy, macro-F1, per-class counts.
Inputs are batched in length order (less padding) under `torch.inference_mode()`, and the cancel
token is checked between batches.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from merging_core.errors import EvaluationError, UnknownMethodError
from merging_core.plugins.optimizer_base import mean_entropy
from merging_core.runtime.cancel import CancelToken, Progress, check, report
from merging_core.evaluation.data import TaskData
from merging_core.evaluation.holder import ModelHolder, quiet_transformers
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

    n_prompts = len(prompts)
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
    packing = PackedLabels.of(label_ids, device)
    if packing.single_tokens:
        return packing.first_scores(first)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    inputs = {"input_ids": packing.packed.expand(n_prompts, packing.total),
              "attention_mask": packing.mask(prompt_mask.bool(), next(model.parameters()).dtype), "cache": cache,
              "use_cache": True, "position_ids": lengths[:, None] + packing.offset[None, :]}
    if _plain_output_layer(model):
        # The output layer (the whole vocabulary) only where a label token is predicted: at many
        # labels it is most of the work.
        hidden = model.get_decoder()(**inputs).last_hidden_state[:, packing.scored]  # [prompts, S, hidden]
        logits = model.get_output_embeddings()(hidden).float()
    else:
        logits = model(**inputs).logits[:, packing.scored].float()  # [prompts, S, vocab]
    return packing.scores(first, logits)


@dataclass(frozen=True)
class PackedLabels:
    """Every label's tokens packed one after another into one row (T tokens in all), for scoring
    all labels after one shared prefix in a single pass: each label token sees the prefix and
    the earlier tokens of its own label, never another label, and its position continues from
    the prefix's end (`offset`)."""

    packed: torch.Tensor  # [T] the labels' tokens
    starts: list[int]  # where each label starts in `packed`, then T
    owner: torch.Tensor  # [T] the label each token belongs to
    offset: torch.Tensor  # [T] each token's place in its own label
    scored: torch.Tensor  # [T] bool: the token predicts its label's next token (not its label's last)

    @classmethod
    def of(cls, label_ids: Sequence[Sequence[int]], device: torch.device) -> PackedLabels:
        starts = [0]
        for ids in label_ids:
            starts.append(starts[-1] + len(ids))
        packed = torch.tensor([token for ids in label_ids for token in ids], device=device)
        owner = torch.repeat_interleave(torch.arange(len(label_ids), device=device),
                                        torch.tensor([len(ids) for ids in label_ids], device=device))
        offset = torch.arange(starts[-1], device=device) - torch.tensor(starts[:-1], device=device)[owner]
        scored = torch.ones(starts[-1], dtype=torch.bool, device=device)
        scored[torch.tensor(starts[1:], device=device) - 1] = False
        return cls(packed, starts, owner, offset, scored)

    @property
    def total(self) -> int:
        return self.starts[-1]

    @property
    def single_tokens(self) -> bool:
        return self.total == len(self.starts) - 1

    def first_scores(self, first: torch.Tensor) -> torch.Tensor:
        """[rows, labels]: each label's first token, from the prefix's last log-probabilities."""
        return first[:, self.packed[self.starts[:-1]]]

    def mask(self, prefix_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The additive 4D mask [rows, 1, T, prefix + T] of the packed pass (`prefix_mask`: [rows,
        prefix] bool, False at padding)."""
        rows, width = prefix_mask.shape
        among = ((self.owner[:, None] == self.owner[None, :])
                 & (self.offset[:, None] >= self.offset[None, :]))  # [T, T]
        sees = torch.cat([prefix_mask[:, None, :].expand(rows, self.total, width),
                          among[None].expand(rows, self.total, self.total)], dim=2)[:, None]
        return torch.zeros(sees.shape, dtype=dtype, device=sees.device).masked_fill(~sees, torch.finfo(dtype).min)

    def scores(self, first: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """log P(label | prefix), [rows, labels], from the prefix's last log-probabilities and
        the packed pass's logits at the scored positions ([rows, S, vocab])."""
        rows = logits.shape[0]
        targets = self.packed[1:][self.scored[:-1]]  # [S]: the tokens predicted at the scored positions
        # log-softmax at the targets only: logit - logsumexp (no second [.., vocab] copy)
        picked = logits.gather(2, targets.expand(rows, -1)[:, :, None]).squeeze(2) - torch.logsumexp(logits, -1)
        later = torch.zeros(rows, len(self.starts) - 1, dtype=picked.dtype, device=logits.device)
        later = later.index_add(1, self.owner[self.scored], picked)
        return self.first_scores(first) + later


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
    return error_rates([_normalise(r) for r in references], [_normalise(o) for o in outputs]), {}


def error_rates(golds: Sequence[str], hypotheses: Sequence[str]) -> dict[str, float]:
    """Exact match, and WER and CER with jiwer (corpus-level: errors over reference words)."""
    import jiwer

    exact = sum(h == g for h, g in zip(hypotheses, golds)) / len(golds)
    # jiwer refuses empty references; score an empty reference as a word-level "" vs hypothesis.
    safe_golds = [g or "<empty>" for g in golds]
    safe_hyps = [h or "<empty>" for h in hypotheses]
    return {
        "exact_match": exact,
        "wer": float(jiwer.wer(safe_golds, safe_hyps)),
        "cer": float(jiwer.cer(safe_golds, safe_hyps)),
    }


# --- speech: a Whisper-like encoder-decoder on audio clips (model_class speech_seq2seq) --------
# The task's inputs are clip keys; the holder keeps the clips and makes their input features.
# Whisper's encoder always sees 30 s of audio, so batches are ordered by clip duration only for
# the decoder's sake (similar transcript lengths).


def duration_sorted_batches(holder: Any, keys: Sequence[str], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(keys)), key=lambda i: len(holder.clips.samples(keys[i])))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def speech_normalise(text: str) -> str:
    """transformers' Whisper `BasicTextNormalizer` (lower case, no punctuation or bracketed
    text), whitespace collapsed. Not the English normalizer: that one needs Whisper's spelling
    map, which the model package does not ship."""
    return " ".join(_basic_normalizer()(text).split())


@functools.cache
def _basic_normalizer() -> Callable[[str], str]:
    from transformers.models.whisper.english_normalizer import BasicTextNormalizer

    return BasicTextNormalizer()  # type: ignore[no-any-return]


def _require_speech(holder: Any, evaluator: str) -> None:
    if getattr(holder, "feature_extractor", None) is None:
        raise EvaluationError(f"evaluator {evaluator!r} needs a speech model (model_class speech_seq2seq)")


def transcribe(holder: Any, keys: Sequence[str], max_new_tokens: int) -> list[list[int]]:
    """Greedy transcripts (token ids after the decoder prefix, through end-of-text when reached)
    of a batch of clips, with the model's generation config (Whisper's: no timestamps, its
    suppressed tokens)."""
    prefix = holder.decoder_prefix()
    limit = getattr(holder.model.config, "max_target_positions", None)
    if limit is not None and len(prefix) + max_new_tokens > limit:
        raise EvaluationError(f"max_new_tokens {max_new_tokens} is too many: the decoder holds {limit} positions, "
                              f"{len(prefix)} of them the prefix, so at most {limit - len(prefix)}")
    config = copy.deepcopy(holder.model.generation_config)
    config.update(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
    features = holder.features(keys)
    # Whisper's encoder takes no padding (every clip is 30 s of features), so the mask is all ones.
    mask = torch.ones(features.shape[0], features.shape[-1], dtype=torch.long, device=features.device)
    # Whisper's generate passes its own settings beside the config and warns about it on every
    # call; nothing a user can act on.
    with quiet_transformers():
        generated = holder.model.generate(input_features=features, attention_mask=mask, generation_config=config)
    sequences = generated if isinstance(generated, torch.Tensor) else generated.sequences
    out = []
    eos = holder.tokenizer.eos_token_id
    for row in sequences.tolist():
        if row[: len(prefix)] == prefix:  # transformers' Whisper returns the tokens after its prompt
            row = row[len(prefix):]
        if eos in row:
            row = row[: row.index(eos) + 1]
        out.append(row)
    return out


def speech_recognition(ctx: EvalContext) -> tuple[dict[str, float], dict[str, dict[str, int]]]:
    """Greedy transcription of each clip; WER and CER against the reference after
    `speech_normalise`."""
    _require_speech(ctx.holder, "speech_recognition")
    references = ctx.data.references or ctx.data.labels
    if references is None:
        raise EvaluationError("evaluator 'speech_recognition' needs a reference column")
    tokenizer = ctx.holder.tokenizer
    outputs: list[str] = [""] * len(ctx.data)
    batches = duration_sorted_batches(ctx.holder, ctx.data.texts, ctx.task.batch_size)
    with torch.inference_mode():
        for done, batch in enumerate(batches, start=1):
            check(ctx.cancel)
            ids = transcribe(ctx.holder, [ctx.data.texts[i] for i in batch], ctx.task.max_new_tokens)
            for index, text in zip(batch, tokenizer.batch_decode(ids, skip_special_tokens=True)):
                outputs[index] = text
            report(ctx.progress, done, len(batches), "batch")
    return error_rates([speech_normalise(r) for r in references], [speech_normalise(o) for o in outputs]), {}


def speech_label_ids(holder: Any, task: TaskConfig, labels: Sequence[str]) -> list[list[int]]:
    """Each label as the decoder writes it: `label_prefix + label`, then end-of-text, which is
    scored for every label (a label is a whole transcript, not the start of a longer one)."""
    eos = holder.tokenizer.eos_token_id
    if eos is None:
        raise EvaluationError("seq2seq label scoring needs the tokenizer's end-of-text token")
    return [ids + [eos] for ids in label_token_ids(holder.tokenizer, task, labels)]


def seq2seq_label_scores(model: Any, features: torch.Tensor, prefix: Sequence[int],
                         label_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """log P(label | audio) for every (clip, label) pair, [clips, labels].

    The encoder runs once per clip. The decoder runs the shared prefix once per clip with a
    cache (which also holds the cross-attention keys and values of the clip's encoding), then
    every label's tokens packed into one row per clip (`PackedLabels`), as `label_scores` does
    for causal LMs. Equal to one decoder pass per (clip, label), to float precision."""
    from transformers import DynamicCache, EncoderDecoderCache
    from transformers.modeling_outputs import BaseModelOutput

    device = features.device
    clips = features.shape[0]
    encoded = BaseModelOutput(last_hidden_state=model.get_encoder()(input_features=features).last_hidden_state)
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    start = torch.tensor([list(prefix)] * clips, device=device)
    out = model(encoder_outputs=encoded, decoder_input_ids=start, cache=cache, use_cache=True)
    first = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)  # [clips, vocab]
    packing = PackedLabels.of(label_ids, device)
    if packing.single_tokens:
        return packing.first_scores(first)
    prefix_mask = torch.ones(clips, len(prefix), dtype=torch.bool, device=device)
    logits = model(encoder_outputs=encoded, decoder_input_ids=packing.packed.expand(clips, packing.total),
                   decoder_attention_mask=packing.mask(prefix_mask, next(model.parameters()).dtype),
                   decoder_position_ids=(len(prefix) + packing.offset)[None, :].expand(clips, -1),
                   cache=cache, use_cache=True).logits
    return packing.scores(first, logits[:, packing.scored].float())


def seq2seq_label_scoring(ctx: EvalContext) -> tuple[dict[str, float], dict[str, dict[str, int]]]:
    """The label whose text the decoder finds most likely for the clip, after the decoder
    prefix (`ModelHolder.decoder_prefix`); accuracy, macro-F1, per-class counts."""
    _require_speech(ctx.holder, "seq2seq_label_scoring")
    gold = _require_labels(ctx)
    label_ids = speech_label_ids(ctx.holder, ctx.task, ctx.labels)
    prefix = ctx.holder.decoder_prefix()
    predictions: list[str] = [""] * len(ctx.data)
    batches = duration_sorted_batches(ctx.holder, ctx.data.texts, ctx.task.batch_size)
    with torch.inference_mode():
        for done, batch in enumerate(batches, start=1):
            check(ctx.cancel)
            features = ctx.holder.features([ctx.data.texts[i] for i in batch])
            scores = seq2seq_label_scores(ctx.holder.model, features, prefix, label_ids)
            for index, label_id in zip(batch, scores.argmax(dim=-1).tolist()):
                predictions[index] = ctx.labels[label_id]
            report(ctx.progress, done, len(batches), "batch")
    return classification_metrics(predictions, gold, ctx.labels)


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


def speech_label_entropy(holder: Any, task: TaskConfig, keys: Sequence[str], labels: Sequence[str]) -> torch.Tensor:
    """Mean entropy of the softmax over the labels' log-likelihoods given each clip
    (`seq2seq_label_scores`), the distribution `seq2seq_label_scoring` takes its argmax of."""
    _require_speech(holder, "seq2seq_label_scoring")
    scores = seq2seq_label_scores(holder.model, holder.features(keys), holder.decoder_prefix(),
                                  speech_label_ids(holder, task, labels))
    return mean_entropy(scores)


def transcript_entropy(holder: Any, task: TaskConfig, keys: Sequence[str], labels: Sequence[str]) -> torch.Tensor:
    """Mean next-token entropy over the model's own greedy transcript of each clip: up to the
    task's `max_new_tokens` tokens, through the first end-of-text, generated without gradients,
    then scored in one differentiable decoder pass (as `generation_entropy` for causal LMs)."""
    _require_speech(holder, "speech_recognition")
    prefix = holder.decoder_prefix()
    features = holder.features(keys)
    with torch.no_grad():
        transcripts = transcribe(holder, keys, task.max_new_tokens)
    width = max(len(t) for t in transcripts)
    if width == 0:
        raise EvaluationError("transcript entropy: the model generated no token")
    pad = holder.tokenizer.eos_token_id or 0
    continuation = torch.tensor([t + [pad] * (width - len(t)) for t in transcripts], device=holder.device)
    keep = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t in transcripts], device=holder.device)
    start = torch.tensor([prefix] * len(keys), device=holder.device)
    # Padding comes after each transcript, so causal attention keeps it out of the scored positions.
    logits = holder.model(input_features=features, decoder_input_ids=torch.cat([start, continuation], dim=1)).logits
    predicting = logits[:, len(prefix) - 1 : -1].float()  # position t predicts transcript token t
    log_probs = torch.log_softmax(predicting, dim=-1)
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)  # [clips, tokens]
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
        Evaluator(
            "speech_recognition",
            "greedy transcription of the clip; WER and CER (jiwer) after Whisper's basic normalizer",
            {"wer": "lower", "cer": "lower", "exact_match": "higher"},
            speech_recognition,
            needs_labels=False,
            entropy=transcript_entropy,
        ),
        Evaluator(
            "seq2seq_label_scoring",
            "label whose text (then end-of-text) the decoder finds most likely for the clip",
            {"accuracy": "higher", "macro_f1": "higher"},
            seq2seq_label_scoring,
            entropy=speech_label_entropy,
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
