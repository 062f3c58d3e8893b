"""The sparsifiers of the generalized task-arithmetic family, each declared once, as data.

A sparsifier is the first stage of `methods.gta.generalized_task_arithmetic`: it drops entries
of one adapter's dense delta. Its parameters, defaults and range check live here only; both the
pre-merge transforms (`plugins.transforms`) and the merge methods (`dare_linear`, `dare_ties`,
`magnitude_prune`, `breadcrumbs`, `della` in `engine.builtin_methods`) are built from this table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from merging_core.methods import sparsify
from merging_core.params import ParamKind, ParamSpec, Params

SparsifyFn = Callable[[torch.Tensor, Params, torch.Generator | None], torch.Tensor]
# Raises ValueError on a combination of parameters that each pass their own range check.
ParamsCheck = Callable[[Params], None]

_RESCALE = ParamSpec("rescale", ParamKind.BOOL, "rescale kept entries by 1/keep-probability", True)
_SEED = ParamSpec("seed", ParamKind.INT, "random seed; each module draws from (seed, module)", 0, 0)


def _density(default: float, doc: str) -> ParamSpec:
    return ParamSpec("density", ParamKind.FLOAT, doc, default, 0.0, 1.0)


@dataclass(frozen=True)
class SparsifierSpec:
    """One sparsifier: what it keeps (`params`), how, and whether it draws random numbers.

    A seeded sparsifier drops at random: it also takes `rescale` and `seed`
    (`sampling_params`), and `fn` gets a generator seeded by its caller from `seed`.
    """

    name: str
    doc: str
    params: tuple[ParamSpec, ...]
    fn: SparsifyFn
    seeded: bool = False
    check: ParamsCheck | None = None

    @property
    def sampling_params(self) -> tuple[ParamSpec, ...]:
        return (_RESCALE, _SEED) if self.seeded else ()

    @property
    def all_params(self) -> tuple[ParamSpec, ...]:
        return self.params + self.sampling_params


def _della_range(params: Params) -> None:
    density, epsilon = params["density"], params["epsilon"]
    if density - epsilon / 2 <= 0 or density + epsilon / 2 > 1:
        raise ValueError(
            f"density={density} and epsilon={epsilon} give keep probabilities outside (0, 1]; "
            "need density - epsilon/2 > 0 and density + epsilon/2 <= 1"
        )


SPARSIFIERS: dict[str, SparsifierSpec] = {
    spec.name: spec
    for spec in (
        SparsifierSpec(
            "magnitude",
            "keep the top `density` fraction by magnitude (TIES trim)",
            (_density(0.2, "fraction of each delta's entries kept"),),
            lambda delta, p, g: sparsify.magnitude(delta, p["density"]),
        ),
        SparsifierSpec(
            "dare",
            "drop entries at random, keep `density`, rescale (DARE)",
            (_density(0.5, "keep probability of each entry"),),
            lambda delta, p, g: sparsify.random_drop(
                delta, p["density"], rescale=p["rescale"], generator=g
            ),
            seeded=True,
        ),
        SparsifierSpec(
            "breadcrumbs",
            "drop the top `gamma` outliers and keep the next `density` (Model Breadcrumbs)",
            (
                _density(0.9, "fraction kept after removing the outliers"),
                ParamSpec("gamma", ParamKind.FLOAT, "fraction of largest magnitudes dropped",
                          0.01, 0.0, 1.0),
            ),
            lambda delta, p, g: sparsify.breadcrumbs(delta, p["density"], p["gamma"]),
        ),
        SparsifierSpec(
            "della",
            "magnitude-ranked random drop (DELLA MagPrune)",
            (
                _density(0.5, "mean keep probability"),
                ParamSpec("epsilon", ParamKind.FLOAT, "spread of keep probabilities by rank",
                          0.1, 0.0, 1.0),
            ),
            lambda delta, p, g: sparsify.della_magprune(
                delta, p["density"], p["epsilon"], rescale=p["rescale"], generator=g
            ),
            seeded=True,
            check=_della_range,
        ),
    )
}
