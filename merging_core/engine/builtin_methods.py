"""Registration of every built-in merge method, each with its parameter schema.

Adding a method: write `merging_core/methods/<name>.py` (a pure tensor function) and register
it here. A sparsify-then-combine method needs no file of its own: it is one `_sparsified` entry
naming a sparsifier of `plugins.sparsifiers` (which declares its parameters) and a sign
consensus. `engine/__init__` imports this module, so registration never depends on a caller
remembering an import.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from merging_core.engine import saving
from merging_core.engine.registry import MergeMethod, register
from merging_core.methods import (
    knots,
    linear,
    regmean,
    slerp,
    task_vector,
    ties,
    tsv,
    uniform,
    weighted,
    weighted_delta,
)
from merging_core.methods.gta import Consensus, generalized_task_arithmetic
from merging_core.params import ParamKind, Params, ParamSpec
from merging_core.plugins.sparsifiers import SPARSIFIERS

_LAMBDA_SCALE = ParamSpec(
    "lambda",
    ParamKind.WEIGHTS,
    "scale applied to the merged delta, or a list with one weight per adapter",
    1.0,
)
_LAMBDA_PAIR = ParamSpec(
    "lambda",
    ParamKind.WEIGHTS,
    "with 2 adapters a number l means weights (l, 1 - l); otherwise one weight per adapter",
)


def _lambda_pair(params: dict, n_adapters: int) -> None:
    linear.convex_pair(params["lambda"], n_adapters)


def _sparsified(
    name: str, sparsifier: str, consensus: Consensus | None, *, doc: str, paper: str
) -> MergeMethod:
    """A generalized task-arithmetic method: `sparsifier` on each delta, weights from `lambda`,
    then a weighted sum (`consensus` None) or sign election and disjoint mean ("total")."""
    spec = SPARSIFIERS[sparsifier]
    check = spec.check

    def merge(
        deltas: Sequence[torch.Tensor], params: Params, generator: torch.Generator | None
    ) -> torch.Tensor:
        # One generator, seeded from (seed, module) by the caller, serves the adapters in order.
        return generalized_task_arithmetic(
            deltas,
            weights=linear.per_adapter(params["lambda"], len(deltas)),
            sparsify=lambda delta, _index: spec.fn(delta, params, generator),
            consensus=consensus,
        )

    return MergeMethod(
        name=name,
        doc=doc,
        paper=paper,
        params=(*spec.params, _LAMBDA_SCALE, *spec.sampling_params),
        seeded=spec.seeded,
        params_validator=None if check is None else lambda params, _n_adapters: check(params),
        merge_in_memory=merge,
        save_fn=saving.save_svd,
    )


def _regmean(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
    grams: Sequence[torch.Tensor],
    params: Params,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    merged = regmean.regmean(factors, grams, alpha=params["alpha"], lam=params["lambda"],
                             task_weights=params["task_weights"])
    return merged.lora_B, merged.lora_A, ({"eps": merged.eps} if merged.eps else {})


def _regmean_weights(params: Params, n_adapters: int) -> None:
    weights = linear.per_adapter(params["task_weights"], n_adapters, "task_weights")
    if max(weights) <= 0.0:
        raise ValueError("task_weights: at least one task needs a positive weight")


BUILTIN_METHODS = (
    MergeMethod(
        name="uniform",
        doc="Mean of the dense deltas.",
        paper="Wortsman et al. 2022, Model soups",
        params=(),
        merge_in_memory=lambda deltas, p, g: uniform.uniform(deltas),
        linear_coefficients=lambda p, n: uniform.coefficients(n),
        save_fn=saving.save_linear,
    ),
    MergeMethod(
        name="weighted",
        doc="Weights the LoRA factors A and B themselves (equal ranks); saved at that rank.",
        paper="PEFT add_weighted_adapter(combination_type='linear')",
        params=(_LAMBDA_PAIR,),
        params_validator=_lambda_pair,
        space="factors",
        same_rank=True,
        merge_in_memory=lambda factors, p: weighted.weighted(factors, p["lambda"]),
        save_fn=saving.save_factors,
    ),
    MergeMethod(
        name="weighted_delta",
        doc="sum_i w_i * delta_i on the dense deltas, exact.",
        paper="Wortsman et al. 2022, Model soups",
        params=(_LAMBDA_PAIR,),
        params_validator=_lambda_pair,
        merge_in_memory=lambda deltas, p, g: weighted_delta.weighted_delta(deltas, p["lambda"]),
        linear_coefficients=lambda p, n: weighted_delta.coefficients(p["lambda"], n),
        save_fn=saving.save_linear,
    ),
    MergeMethod(
        name="task_vector",
        doc="Task arithmetic: lambda * sum_i delta_i (or sum_i lambda_i * delta_i).",
        paper="Ilharco et al. 2023, Editing Models with Task Arithmetic",
        params=(_LAMBDA_SCALE,),
        min_adapters=1,
        merge_in_memory=lambda deltas, p, g: task_vector.task_vector(deltas, p["lambda"]),
        linear_coefficients=lambda p, n: task_vector.coefficients(p["lambda"], n),
        save_fn=saving.save_linear,
    ),
    MergeMethod(
        name="ties",
        doc="TIES: keep top-k% magnitudes, elect signs, disjoint mean, scale by lambda.",
        paper="Yadav et al. 2023, TIES-Merging",
        params=(
            ParamSpec("k", ParamKind.FLOAT, "percent of each delta's entries kept", 20.0, 0.0, 100.0),
            _LAMBDA_SCALE,
        ),
        merge_in_memory=lambda deltas, p, g: ties.ties(deltas, k=p["k"], lam=p["lambda"]),
        save_fn=saving.save_svd,
    ),
    _sparsified(
        "dare_linear", "dare", None,
        doc="DARE: random drop with rescale, then weighted sum.",
        paper="Yu et al. 2024, Language Models are Super Mario",
    ),
    _sparsified(
        "dare_ties", "dare", "total",
        doc="DARE random drop with rescale, then TIES sign election and disjoint mean.",
        paper="Yu et al. 2024, Language Models are Super Mario",
    ),
    _sparsified(
        "magnitude_prune", "magnitude", None,
        doc="Keep the top `density` magnitudes of each delta, then weighted sum.",
        paper="Yadav et al. 2023 (TIES trim step)",
    ),
    _sparsified(
        "breadcrumbs", "breadcrumbs", None,
        doc="Drop the top `gamma` outliers and the small tail, keep `density`, weighted sum.",
        paper="Davari & Belilovsky 2024, Model Breadcrumbs",
    ),
    _sparsified(
        "della", "della", "total",
        doc="DELLA: magnitude-ranked random drop (MagPrune), sign election, disjoint mean.",
        paper="Deep et al. 2024, DELLA-Merging",
    ),
    MergeMethod(
        name="slerp",
        doc="Spherical interpolation between two deltas (t=0: first, t=1: second).",
        paper="Shoemake 1985; mergekit",
        params=(ParamSpec("t", ParamKind.FLOAT, "interpolation factor", 0.5, 0.0, 1.0),),
        max_adapters=2,
        merge_in_memory=lambda deltas, p, g: slerp.slerp(deltas, t=p["t"]),
        save_fn=saving.save_svd,
    ),
    MergeMethod(
        name="tsv",
        doc="Task Singular Vectors: whiten each task's singular vectors against the others, "
        "recombine; exact low rank (sum of ranks).",
        paper="Gargiulo et al. 2025, Task Singular Vectors (TSV-M)",
        params=(ParamSpec("lambda", ParamKind.FLOAT, "scale of the merged delta", 1.0),),
        space="factors",
        merge_in_memory=lambda factors, p: tsv.tsv(factors, lam=p["lambda"]),
        save_fn=saving.save_factors,
    ),
    MergeMethod(
        name="knots",
        doc="KnOTS: shared SVD basis of the concatenated deltas, TIES over the task-specific "
        "right singular vectors; exact low rank (sum of ranks).",
        paper="Stoica et al. 2025, Model merging with SVD to tie the KnOTS",
        params=(
            ParamSpec("k", ParamKind.FLOAT, "percent of each task's V entries kept (TIES)", 20.0, 0.0, 100.0),
            ParamSpec("lambda", ParamKind.FLOAT, "scale of the merged delta", 1.0),
        ),
        space="factors",
        merge_in_memory=lambda factors, p: knots.knots(factors, k=p["k"], lam=p["lambda"]),
        save_fn=saving.save_factors,
    ),
    MergeMethod(
        name="regmean",
        doc="RegMean: per module, the merge that best reproduces each task's outputs on its own "
        "inputs (Gram matrices collected on the resident model); exact low rank (sum of ranks).",
        paper="Jin et al. 2023, Dataless Knowledge Fusion by Merging Weights of Language Models",
        params=(
            ParamSpec("alpha", ParamKind.FLOAT, "scale of the Grams' off-diagonal entries", 0.9, 0.0, 1.0),
            _LAMBDA_SCALE,
            ParamSpec("task_weights", ParamKind.WEIGHTS, "each task's weight w_i in the objective "
                      "sum_i w_i ||X_i (W - W_i)^T||^2: one per adapter (one number: all alike)", 1.0,
                      0.0),
            ParamSpec("samples_per_task", ParamKind.INT, "unlabeled inputs per task for the Grams",
                      256, 1, 1_000_000),
            ParamSpec("split", ParamKind.STRING, "the split whose inputs (labels unused) are used",
                      "train"),
            ParamSpec("seed", ParamKind.INT, "seed of the choice of inputs", 0, 0),
            ParamSpec("plus", ParamKind.BOOL, "RegMean++: each layer's Grams taken through the merge's own "
                      "earlier layers (one partial forward pass per layer and task; not cached)", False),
        ),
        space="grams",
        params_validator=_regmean_weights,
        merge_in_memory=_regmean,
        save_fn=saving.save_factors,
    ),
)

for _method in BUILTIN_METHODS:
    register(_method)
