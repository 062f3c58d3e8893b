"""Registration of every built-in merge method, each with its parameter schema.

Adding a method: write `merging_core/methods/<name>.py` (a pure tensor function) and register
it here. `engine/__init__` imports this module, so registration never depends on a caller
remembering an import.
"""

from __future__ import annotations

from merging_core.engine import saving
from merging_core.engine.registry import MergeMethod, register
from merging_core.methods import (
    breadcrumbs,
    dare_linear,
    dare_ties,
    della,
    knots,
    linear,
    magnitude_prune,
    slerp,
    task_vector,
    ties,
    tsv,
    uniform,
    weighted,
    weighted_delta,
)
from merging_core.params import ParamKind, ParamSpec

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
_SEED = ParamSpec("seed", ParamKind.INT, "random seed; each module draws from (seed, module)", 0, 0)
_RESCALE = ParamSpec("rescale", ParamKind.BOOL, "rescale kept entries by 1/keep-probability", True)


def _density(default: float, doc: str = "fraction of each delta's entries kept") -> ParamSpec:
    return ParamSpec("density", ParamKind.FLOAT, doc, default, 0.0, 1.0)


def _della_range(params: dict, n_adapters: int) -> None:
    if params["density"] - params["epsilon"] / 2 <= 0 or params["density"] + params["epsilon"] / 2 > 1:
        raise ValueError(
            f"density={params['density']} and epsilon={params['epsilon']} give keep "
            "probabilities outside (0, 1]; need density - epsilon/2 > 0 and density + epsilon/2 <= 1"
        )


def _lambda_pair(params: dict, n_adapters: int) -> None:
    linear.convex_pair(params["lambda"], n_adapters)


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
    MergeMethod(
        name="dare_linear",
        doc="DARE: random drop with rescale, then weighted sum.",
        paper="Yu et al. 2024, Language Models are Super Mario",
        params=(_density(0.5, "keep probability of each entry"), _LAMBDA_SCALE, _RESCALE, _SEED),
        seeded=True,
        merge_in_memory=lambda deltas, p, g: dare_linear.dare_linear(
            deltas, density=p["density"], lam=p["lambda"], rescale=p["rescale"], generator=g
        ),
        save_fn=saving.save_svd,
    ),
    MergeMethod(
        name="dare_ties",
        doc="DARE random drop with rescale, then TIES sign election and disjoint mean.",
        paper="Yu et al. 2024, Language Models are Super Mario",
        params=(_density(0.5, "keep probability of each entry"), _LAMBDA_SCALE, _RESCALE, _SEED),
        seeded=True,
        merge_in_memory=lambda deltas, p, g: dare_ties.dare_ties(
            deltas, density=p["density"], lam=p["lambda"], rescale=p["rescale"], generator=g
        ),
        save_fn=saving.save_svd,
    ),
    MergeMethod(
        name="magnitude_prune",
        doc="Keep the top `density` magnitudes of each delta, then weighted sum.",
        paper="Yadav et al. 2023 (TIES trim step)",
        params=(_density(0.2), _LAMBDA_SCALE),
        merge_in_memory=lambda deltas, p, g: magnitude_prune.magnitude_prune(
            deltas, density=p["density"], lam=p["lambda"]
        ),
        save_fn=saving.save_svd,
    ),
    MergeMethod(
        name="breadcrumbs",
        doc="Drop the top `gamma` outliers and the small tail, keep `density`, weighted sum.",
        paper="Davari & Belilovsky 2024, Model Breadcrumbs",
        params=(
            _density(0.9, "fraction kept after removing the outliers"),
            ParamSpec("gamma", ParamKind.FLOAT, "fraction of largest magnitudes dropped", 0.01, 0.0, 1.0),
            _LAMBDA_SCALE,
        ),
        merge_in_memory=lambda deltas, p, g: breadcrumbs.breadcrumbs(
            deltas, density=p["density"], gamma=p["gamma"], lam=p["lambda"]
        ),
        save_fn=saving.save_svd,
    ),
    MergeMethod(
        name="della",
        doc="DELLA: magnitude-ranked random drop (MagPrune), sign election, disjoint mean.",
        paper="Deep et al. 2024, DELLA-Merging",
        params=(
            _density(0.5, "mean keep probability"),
            ParamSpec("epsilon", ParamKind.FLOAT, "spread of keep probabilities by rank", 0.1, 0.0, 1.0),
            _LAMBDA_SCALE,
            _RESCALE,
            _SEED,
        ),
        seeded=True,
        params_validator=_della_range,
        merge_in_memory=lambda deltas, p, g: della.della(
            deltas, density=p["density"], epsilon=p["epsilon"], lam=p["lambda"],
            rescale=p["rescale"], generator=g,
        ),
        save_fn=saving.save_svd,
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
)

for _method in BUILTIN_METHODS:
    register(_method)
