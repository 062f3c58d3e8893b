"""AdaMerging: learn one coefficient per (adapter, layer) by entropy minimisation.

Yang et al., ICLR 2024, "AdaMerging: Adaptive Model Merging for Multi-Task Learning". The merged
model is W0 + sum_i lambda[i, layer] * dW_i; the lambdas are trained with Adam to minimise the
mean prediction entropy on each task's unlabeled inputs, as the task's evaluator defines it
(`EvalSession.prediction_entropy`): its own head's class distribution for sequence
classification, the softmax over the labels' log-likelihoods for label scoring (each prompt
computed once), and the mean next-token entropy over the model's own greedy continuation (up to
the task's `max_new_tokens`) for generation.
The learned lambdas become a `per_layer` policy, which is then merged, saved and evaluated like
any other.

Two implementations, same maths:
- `streaming_parametrize` (default): a forward hook on each target module adds
  sum_i lambda[i, l] * s_i * B_i (A_i x). The deltas stay factored (O(r) per token); the base
  weights are never copied, and gradients reach only the lambdas. With `delta_residency:
  cpu_stream` the factors live on the CPU and move to the device per module and step;
  `gpu_cache` keeps them on the device.
- `functional_clone_legacy`: `torch.func.functional_call` over cloned dense weights
  W0 + sum_i lambda[i, l] dW_i, as the reference implementation does; kept for comparison, on
  sequence classification tasks only.
The model is changed only through its holder (`hooked`, `frozen`, `head`, `cpu_float32`), which
undoes every change on exit, including cancellation; its weights are never modified.
"""

from __future__ import annotations

import io
import logging
import math
import random
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from merging_core.adapters import LayerKey, LoraAdapter, layer_keys, layer_sort_key
from merging_core.errors import EvaluationError, ParamError
from merging_core.params import ParamKind, ParamSpec, Params
from merging_core.plugins.optimizer_base import (
    ForwardHook,
    OptimizerContext,
    OptimizerResult,
    OptimizerSession,
    OptimizerSpec,
    ResidentModel,
    mean_entropy,
)
from merging_core.policies import LambdaPolicy
from merging_core.runtime.cancel import check, report

log = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SUPPORTED_METHODS = ("task_vector", "weighted_delta")
SUPPORTED_EVALUATORS = ("sequence_classification", "causal_lm_label_scoring", "generation", "speech_recognition",
                        "seq2seq_label_scoring")

PARAMS = (
    ParamSpec("merge_impl", ParamKind.CHOICE, "how the merged weights are formed",
              "streaming_parametrize", choices=("streaming_parametrize", "functional_clone_legacy")),
    ParamSpec("delta_residency", ParamKind.CHOICE, "where the LoRA factors live during training",
              "cpu_stream", choices=("cpu_stream", "gpu_cache")),
    ParamSpec("dtype_compute", ParamKind.CHOICE, "autocast dtype of the forward passes", "auto",
              choices=("auto", "bf16", "fp16", "fp32")),
    ParamSpec("force_cpu", ParamKind.BOOL, "train on a CPU float32 copy of the base model", False),
    ParamSpec("steps", ParamKind.INT, "optimisation steps", 100, 1, 100_000),
    ParamSpec("lr", ParamKind.FLOAT, "Adam learning rate", 0.005, 0.0, 10.0),
    ParamSpec("batch_size", ParamKind.INT, "unlabeled inputs per task per step", 16, 1, 4096),
    ParamSpec("split", ParamKind.STRING, "the split whose inputs (labels unused) are used", "train"),
    ParamSpec("samples_per_task", ParamKind.INT, "cap on unlabeled inputs per task", 256, 1, 1_000_000),
    ParamSpec("init_lambda", ParamKind.FLOAT, "initial coefficient (paper: 0.3)", 0.3),
    ParamSpec("clamp_min", ParamKind.FLOAT, "lower clamp of every lambda", 0.0),
    ParamSpec("clamp_max", ParamKind.FLOAT, "upper clamp of every lambda", 1.0),
    ParamSpec("seed", ParamKind.INT, "seed for batch order", 0, 0),
)


def _validate(params: Params) -> None:
    if params["clamp_min"] > params["clamp_max"]:
        raise ValueError("clamp_min must not exceed clamp_max")
    if not params["clamp_min"] <= params["init_lambda"] <= params["clamp_max"]:
        raise ValueError("init_lambda must lie within [clamp_min, clamp_max]")


class LayerLambdas:
    """Index of the trainable coefficients: one row per adapter, one column per layer key (an
    index, or `encoder.3` / `decoder.3` in an encoder-decoder model)."""

    def __init__(self, modules: Sequence[str], layer_of: dict[str, LayerKey | None], n_adapters: int,
                 init: float) -> None:
        self.layers = sorted({key for m in modules if (key := layer_of[m]) is not None}, key=layer_sort_key)
        self.column = {layer: i for i, layer in enumerate(self.layers)}
        self.modules = [m for m in modules if layer_of[m] is not None]
        self.layer_of = layer_of
        self.values = nn.Parameter(torch.full((n_adapters, len(self.layers)), float(init)))

    def of(self, module: str) -> torch.Tensor:
        return self.values[:, self.column[self.layer_of[module]]]  # type: ignore[index]


class FactoredDeltas:
    """Per module, every adapter's LoRA factors stacked along the rank: A [sum r_i, in],
    B [out, sum r_i], and for each rank column the adapter it belongs to. One pair of matmuls
    then applies all adapters, and the coefficients scale a [tokens, sum r_i] tensor instead
    of one [tokens, out] term per adapter. On the CPU (`cpu_stream`) or cached on the device."""

    def __init__(self, adapters: Sequence[LoraAdapter], modules: Sequence[str], device: torch.device,
                 residency: str) -> None:
        self.device = device
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for module in modules:
            sources = [adapter.modules[module] for adapter in adapters]
            lora_A = torch.cat([source.lora_A for source in sources], dim=0)
            lora_B = torch.cat([source.lora_B for source in sources], dim=1)
            owner = torch.cat([torch.full((source.lora_A.shape[0],), index, dtype=torch.long)
                               for index, source in enumerate(sources)])
            scaling = torch.tensor([float(source.scaling) for source in sources])
            if residency == "gpu_cache":
                lora_A, lora_B = lora_A.to(device), lora_B.to(device)
            self.factors[module] = (lora_A, lora_B, owner.to(device), scaling.to(device))

    def get(self, module: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A, B, owner, scaling): A and B moved to the device in `dtype` (a no-op when cached)."""
        lora_A, lora_B, owner, scaling = self.factors[module]
        return (lora_A.to(self.device, dtype, non_blocking=True),
                lora_B.to(self.device, dtype, non_blocking=True), owner, scaling)


def streaming_hooks(lambdas: LayerLambdas, deltas: FactoredDeltas) -> dict[str, ForwardHook]:
    """Forward hooks adding sum_i lambda[i, l] * s_i * B_i (A_i x) to each target module
    (installed by the holder: `holder.hooked(...)`)."""

    def make_hook(name: str) -> ForwardHook:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            x = inputs[0]
            lora_A, lora_B, owner, scaling = deltas.get(name, x.dtype)
            per_rank = (lambdas.of(name).to(scaling.device) * scaling)[owner].to(x.dtype)
            return output + ((x @ lora_A.T) * per_rank) @ lora_B.T

        return hook

    return {name: make_hook(name) for name in lambdas.modules}


def functional_weights(model: nn.Module, lambdas: LayerLambdas, adapters: Sequence[LoraAdapter],
                       transpose: bool) -> dict[str, torch.Tensor]:
    """Cloned dense weights W0 + sum_i lambda[i, l] dW_i (the legacy path)."""
    modules = dict(model.named_modules())
    weights = {}
    for name in lambdas.modules:
        base = modules[name].weight
        merged = base.detach().clone()
        coefficients = lambdas.of(name)
        for index, adapter in enumerate(adapters):
            delta = adapter.modules[name].delta().to(base.device, base.dtype)
            merged = merged + coefficients[index].to(base.dtype) * (delta.T if transpose else delta)
        weights[f"{name}.weight"] = merged
    return weights


class AdaMergingTrainer:
    """Entropy minimisation over per-layer lambdas on a resident model (one step at a time)."""

    def __init__(self, session: OptimizerSession, adapters: Sequence[LoraAdapter], modules: Sequence[str],
                 tasks: Sequence[str], params: Params, holder: ResidentModel | None = None) -> None:
        self.session = session
        self.holder = holder or session.holder
        self.adapters = list(adapters)
        self.tasks = list(tasks)
        self.params = params
        layer_of = layer_keys(modules)
        self.lambdas = LayerLambdas(modules, layer_of, len(self.adapters), params["init_lambda"])
        device = self.holder.device
        self.deltas = FactoredDeltas(self.adapters, self.lambdas.modules, device, params["delta_residency"])
        self.transpose = self.adapters[0].fan_in_fan_out
        choice = params["dtype_compute"]
        if choice == "auto":
            choice = "bf16" if device.type == "cuda" else "fp32"
        self.compute_dtype = _DTYPES[choice]
        self.inputs = {task: self._inputs(task) for task in self.tasks}
        self.optimizer = torch.optim.Adam([self.lambdas.values], lr=params["lr"])
        self.rng = random.Random(params["seed"])

    def _inputs(self, task: str) -> list[str]:
        texts = list(self.session.unlabeled_texts(task, self.params["split"]))
        random.Random(f"{self.params['seed']}:{task}").shuffle(texts)
        return texts[: self.params["samples_per_task"]]

    def _encode(self, task: str, texts: list[str]) -> dict[str, torch.Tensor]:
        encoded = self.holder.tokenizer(texts, padding=True, truncation=True,
                                        max_length=self.session.max_length(task), return_tensors="pt")
        return {k: v.to(self.holder.device) for k, v in encoded.items()}

    def batch(self, task: str) -> list[str]:
        texts = self.inputs[task]
        return self.rng.sample(texts, min(self.params["batch_size"], len(texts)))

    def _autocast(self) -> Any:
        if self.compute_dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.holder.device.type, dtype=self.compute_dtype)

    def loss(self, batches: dict[str, list[str]], impl: str | None = None) -> torch.Tensor:
        """Sum over tasks of the mean prediction entropy on task t's batch (as t's evaluator
        defines it)."""
        impl = impl or self.params["merge_impl"]
        total = torch.zeros(())
        for task, texts in batches.items():
            with self._autocast():
                if impl == "streaming_parametrize":
                    with self.holder.hooked(streaming_hooks(self.lambdas, self.deltas)):
                        entropy = self.session.prediction_entropy(task, texts, self.holder)
                else:  # sequence classification only (checked in `run`)
                    model = self.holder.model
                    weights = functional_weights(model, self.lambdas, self.adapters, self.transpose)
                    with self.holder.head(self.session.head(task)):
                        logits = torch.func.functional_call(
                            model, weights, args=(), kwargs=self._encode(task, texts)).logits
                    entropy = mean_entropy(logits)
            total = total + entropy.cpu()
        return total

    def step(self) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss({task: self.batch(task) for task in self.tasks})
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            self.lambdas.values.clamp_(self.params["clamp_min"], self.params["clamp_max"])
        return float(loss.detach())

    def policy(self) -> LambdaPolicy:
        values = self.lambdas.values.detach()
        overrides = {layer: [round(float(v), 6) for v in values[:, column]]
                     for layer, column in self.lambdas.column.items()}
        return LambdaPolicy(kind="per_layer", overrides=overrides)


def _plot_curve(curve: list[float]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.8))
    axis.plot(range(1, len(curve) + 1), curve)
    axis.set_xlabel("step")
    axis.set_ylabel("sum over tasks of mean entropy")
    axis.set_title("AdaMerging")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def run(ctx: OptimizerContext, params: Params) -> OptimizerResult:
    session = ctx.session
    if session is None:
        raise ParamError(
            "optimizer 'adamerging' needs the base model and task data: run it with a workspace "
            "(lora-merge merge --workspace ..., or through the service)"
        )
    tasks = [a.name for a in ctx.adapters]
    evaluators = {task: session.evaluator_of(task) for task in tasks}
    ADAMERGING.check(ctx.method, tasks, evaluators)
    ADAMERGING.check_adapters(ctx.adapters, evaluators)
    if params["merge_impl"] == "functional_clone_legacy" and set(evaluators.values()) != {"sequence_classification"}:
        raise ParamError("optimizer 'adamerging': merge_impl functional_clone_legacy works on sequence "
                         "classification tasks only; use streaming_parametrize")
    with session.holder.cpu_float32() if params["force_cpu"] else nullcontext(session.holder) as holder:
        trainer = AdaMergingTrainer(session, ctx.adapters, ctx.modules, tasks, params, holder)
        if not trainer.lambdas.modules:
            raise ParamError("optimizer 'adamerging': no adapter module has a layer index to learn")
        curve: list[float] = []
        with holder.frozen():
            for step in range(params["steps"]):
                check(ctx.cancel)
                curve.append(trainer.step())
                report(ctx.progress, step + 1, params["steps"],
                       f"adamerging step {step + 1} entropy {curve[-1]:.4f}", entropy=curve[-1])
    if any(not math.isfinite(v) for v in curve):
        raise EvaluationError("adamerging diverged (non-finite entropy); lower lr")
    policy = trainer.policy()
    learned = {
        "tasks": tasks,
        "layers": trainer.lambdas.layers,
        "lambdas": {str(layer): values for layer, values in policy.overrides.items()},
        "entropy": curve,
        "params": params,
    }
    return OptimizerResult(
        policy=policy,
        artifacts={"adamerging_lambdas.json": learned, "adamerging_entropy.png": _plot_curve(curve)},
        summary={"final_entropy": curve[-1], "initial_entropy": curve[0], "steps": len(curve)},
    )


ADAMERGING = OptimizerSpec(
    "adamerging",
    "learn per-layer, per-adapter lambdas by entropy minimisation (Yang et al., ICLR 2024)",
    PARAMS,
    run,
    params_validator=_validate,
    methods=SUPPORTED_METHODS,
    evaluators=SUPPORTED_EVALUATORS,
    heads_for=("sequence_classification",),
    # Modules outside any numbered layer are not learned: they keep the initial coefficient.
    initial_lambda=lambda params, n_adapters: [params["init_lambda"]] * n_adapters,
)
