"""Every method on real tiny PEFT adapters, and numerical agreement with peft's merge_utils."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft.utils import merge_utils

from merging_core import list_methods, prepare_merge
from merging_core.engine import get_method
from merging_core.engine.merge import module_generator
from merging_core.errors import ParamError
from merging_core.methods import sparsify
from merging_core.methods.gta import generalized_task_arithmetic
from merging_core.methods.task_vector import task_vector
from merging_core.methods.ties import ties
from merging_core.plugins.sparsifiers import SPARSIFIERS
from merging_core.plugins.transforms import TRANSFORMS, build_transform

# method -> (params, needs equal ranks / exactly two adapters)
MATRIX: dict[str, tuple[dict, str]] = {
    "uniform": ({}, "mixed"),
    "weighted": ({"lambda": 0.3}, "pair"),
    "weighted_delta": ({"lambda": [0.2, 0.3, 0.5]}, "mixed"),
    "task_vector": ({"lambda": 0.7}, "mixed"),
    "ties": ({"k": 30, "lambda": 1.2}, "mixed"),
    "dare_linear": ({"density": 0.6, "seed": 3}, "mixed"),
    "dare_ties": ({"density": 0.6, "seed": 3, "lambda": [1.0, 0.5, 0.8]}, "mixed"),
    "magnitude_prune": ({"density": 0.3}, "mixed"),
    "breadcrumbs": ({"density": 0.8, "gamma": 0.05}, "mixed"),
    "della": ({"density": 0.5, "epsilon": 0.2, "seed": 1}, "mixed"),
    "slerp": ({"t": 0.25}, "pair"),
    "tsv": ({"lambda": 0.9}, "mixed"),
    "knots": ({"k": 40, "lambda": 1.1}, "mixed"),
}


def test_matrix_covers_every_registered_method() -> None:
    """Every method that merges from the adapters alone (RegMean also needs activations: its
    own tests, tests/test_regmean.py)."""
    assert set(MATRIX) == {m.name for m in list_methods() if not m.needs_grams}


def _sources(kind: str, adapters: dict[str, Path], pair: dict[str, Path]) -> list[str]:
    return [str(p) for p in (adapters if kind == "mixed" else pair).values()]


@pytest.mark.parametrize("method", sorted(MATRIX))
def test_every_method_merges_real_adapters(
    method: str, adapters: dict[str, Path], equal_rank_adapters: dict[str, Path]
) -> None:
    params, kind = MATRIX[method]
    output = prepare_merge(
        {"adapters": _sources(kind, adapters, equal_rank_adapters), "method": method,
         "method_params": params}
    )
    if kind == "mixed":
        assert len({a.modules[output.modules[0]].rank for a in output.adapters}) > 1
    deltas = output.deltas()
    assert set(deltas) == set(output.modules)
    for module, delta in deltas.items():
        source = output.adapters[0].modules[module]
        assert delta.shape == source.shape
        assert torch.isfinite(delta).all()
        assert delta.abs().sum() > 0
    # Seeded methods are reproducible.
    again = prepare_merge(
        {"adapters": _sources(kind, adapters, equal_rank_adapters), "method": method,
         "method_params": params}
    ).deltas()
    for module in deltas:
        torch.testing.assert_close(deltas[module], again[module], rtol=0, atol=0)


def test_linear_methods_are_exact_weighted_sums(adapters: dict[str, Path]) -> None:
    output = prepare_merge(
        {"adapters": [str(p) for p in adapters.values()], "method": "weighted_delta",
         "method_params": {"lambda": [0.2, 0.3, 0.5]}}
    )
    for module in output.modules:
        expected = sum(
            w * a.modules[module].delta() for w, a in zip([0.2, 0.3, 0.5], output.adapters)
        )
        torch.testing.assert_close(output.delta(module), expected, rtol=1e-6, atol=1e-7)


def test_weighted_with_two_adapters_uses_lambda_and_one_minus(equal_rank_adapters) -> None:
    output = prepare_merge(
        {"adapters": [str(p) for p in equal_rank_adapters.values()], "method": "weighted",
         "method_params": {"lambda": 0.3}}
    )
    left, right = output.adapters
    module = output.modules[0]
    lm, rm = left.modules[module], right.modules[module]
    lora_B = 0.3 * lm.scaling * lm.lora_B + 0.7 * rm.scaling * rm.lora_B
    lora_A = 0.3 * lm.lora_A + 0.7 * rm.lora_A
    torch.testing.assert_close(output.delta(module), lora_B @ lora_A)


def test_rank_pattern_alpha_pattern_and_rslora_scalings(adapters: dict[str, Path]) -> None:
    output = prepare_merge({"adapters": [str(p) for p in adapters.values()], "method": "uniform"})
    by_name = {a.name: a for a in output.adapters}
    beta = by_name["beta"].modules["model.layers.0.self_attn.q_proj"]
    assert beta.scaling == pytest.approx(16 / 8**0.5)  # rsLoRA
    gamma = by_name["gamma"].modules
    assert gamma["model.layers.1.self_attn.q_proj"].rank == 2
    assert gamma["model.layers.1.self_attn.q_proj"].scaling == pytest.approx(6 / 2)
    assert gamma["model.layers.0.self_attn.q_proj"].scaling == pytest.approx(4 / 4)


def test_per_layer_lambda_policy_resolves_per_key(adapters: dict[str, Path]) -> None:
    paths = [str(p) for p in adapters.values()]
    output = prepare_merge(
        {"adapters": paths, "method": "task_vector",
         "lambda_policy": {"type": "per_layer", "default": 0.5, "overrides": {1: 2.0}}}
    )
    plain = prepare_merge({"adapters": paths, "method": "task_vector", "method_params": {"lambda": 1.0}})
    for module in output.modules:
        factor = 2.0 if ".layers.1." in module else 0.5
        torch.testing.assert_close(output.delta(module), factor * plain.delta(module))


def test_transforms_run_before_the_method(adapters: dict[str, Path]) -> None:
    paths = [str(p) for p in adapters.values()]
    trimmed = prepare_merge(
        {"adapters": paths, "method": "task_vector",
         "transforms": [{"name": "magnitude", "params": {"density": 0.2}}]}
    )
    module = trimmed.modules[0]
    expected = sum(sparsify.magnitude(a.modules[module].delta(), 0.2) for a in trimmed.adapters)
    torch.testing.assert_close(trimmed.delta(module), expected)
    with pytest.warns(DeprecationWarning, match="magnitude"):
        alias = prepare_merge(
            {"adapters": paths, "method": "task_vector", "transforms": ["ties_scaffold"]}
        )
    torch.testing.assert_close(alias.delta(module), expected)


# --- agreement with peft.utils.merge_utils on dense deltas -----------------------------------


@pytest.fixture(scope="module")
def dense_deltas(adapters: dict[str, Path]) -> list[list[torch.Tensor]]:
    output = prepare_merge({"adapters": [str(p) for p in adapters.values()], "method": "uniform"})
    return [[a.modules[m].delta() for a in output.adapters] for m in output.modules]


def _merge(method: str, deltas, params: dict, generator: torch.Generator | None = None):
    """A registered delta-space method on plain tensors, its parameters validated as in a run."""
    registered = get_method(method)
    return registered.merge_in_memory(
        deltas, registered.normalize_params(params, len(deltas)), generator
    )


# method -> (sparsifier, consensus): the family is data, so each entry is that pipeline exactly.
FAMILY = {
    "dare_linear": ("dare", None),
    "dare_ties": ("dare", "total"),
    "magnitude_prune": ("magnitude", None),
    "breadcrumbs": ("breadcrumbs", None),
    "della": ("della", "total"),
}


def test_ties_matches_peft(dense_deltas) -> None:
    for deltas in dense_deltas:
        ours = ties(deltas, k=20, lam=1.5)
        theirs = merge_utils.ties(deltas, torch.ones(len(deltas)), density=0.2) * 1.5
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
        weights = [0.5, 1.0, 2.0]
        ours = ties(deltas, k=35, lam=weights)
        theirs = merge_utils.ties(deltas, torch.tensor(weights), density=0.35)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


def test_task_vector_and_magnitude_prune_match_peft(dense_deltas) -> None:
    weights = [0.5, 1.0, 2.0]
    for deltas in dense_deltas:
        ours = task_vector(deltas, weights)
        theirs = merge_utils.task_arithmetic(deltas, torch.tensor(weights))
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
        ours = _merge("magnitude_prune", deltas, {"density": 0.3, "lambda": weights})
        theirs = merge_utils.magnitude_prune(deltas, torch.tensor(weights), density=0.3)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
        # The same maths straight through the pipeline, without the registry.
        direct = generalized_task_arithmetic(
            deltas, weights=weights, sparsify=lambda delta, _: sparsify.magnitude(delta, 0.3)
        )
        torch.testing.assert_close(direct, theirs, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method, theirs_fn", [("dare_linear", merge_utils.dare_linear),
                                               ("dare_ties", merge_utils.dare_ties)])
def test_dare_matches_peft_with_fixed_seeds(dense_deltas, method, theirs_fn) -> None:
    weights = [0.5, 1.0, 2.0]
    consensus = FAMILY[method][1]
    for seed, deltas in enumerate(dense_deltas):
        generator = torch.Generator().manual_seed(seed)
        ours = _merge(method, deltas, {"density": 0.4, "lambda": weights}, generator)
        torch.manual_seed(seed)
        theirs = theirs_fn(deltas, torch.tensor(weights), density=0.4)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
        # One generator serves the adapters in order, as the registry hands it to the method.
        generator = torch.Generator().manual_seed(seed)
        direct = generalized_task_arithmetic(
            deltas, weights=weights, consensus=consensus,
            sparsify=lambda delta, _: sparsify.random_drop(delta, 0.4, generator=generator),
        )
        torch.testing.assert_close(direct, theirs, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", sorted(FAMILY))
def test_sparsified_methods_are_the_pipeline_with_their_sparsifier(dense_deltas, method) -> None:
    sparsifier, consensus = FAMILY[method]
    spec = SPARSIFIERS[sparsifier]
    registered = get_method(method)
    # Parameters are declared once: the method's are the sparsifier's plus lambda.
    assert [p for p in registered.params if p.name != "lambda"] == list(spec.all_params)
    assert list(TRANSFORMS[sparsifier].params) == list(spec.all_params)
    assert registered.seeded == spec.seeded == TRANSFORMS[sparsifier].seeded
    weights = [0.5, 1.0, 2.0]
    for deltas in dense_deltas:
        params = registered.normalize_params({"lambda": weights}, len(deltas))
        generator = module_generator(params["seed"], "m") if spec.seeded else None
        ours = registered.merge_in_memory(deltas, params, generator)
        generator = module_generator(params["seed"], "m") if spec.seeded else None
        expected = generalized_task_arithmetic(
            deltas, weights=weights, consensus=consensus,
            sparsify=lambda delta, _: spec.fn(delta, params, generator),
        )
        torch.testing.assert_close(ours, expected, rtol=0, atol=0)


def test_della_without_spread_is_dare_ties(dense_deltas) -> None:
    for seed, deltas in enumerate(dense_deltas):
        della = _merge("della", deltas, {"density": 0.4, "epsilon": 0.0},
                       torch.Generator().manual_seed(seed))
        dare = _merge("dare_ties", deltas, {"density": 0.4}, torch.Generator().manual_seed(seed))
        torch.testing.assert_close(della, dare, rtol=0, atol=0)


def test_deterministic_transforms_then_task_vector_equal_their_methods(dense_deltas) -> None:
    for name, method, params in [("magnitude", "magnitude_prune", {"density": 0.3}),
                                 ("breadcrumbs", "breadcrumbs", {"density": 0.7, "gamma": 0.05})]:
        transform = build_transform(name, params)
        for deltas in dense_deltas:
            trimmed = [transform.apply(delta, None) for delta in deltas]
            torch.testing.assert_close(
                task_vector(trimmed, 1.0), _merge(method, deltas, params), rtol=0, atol=0
            )


def test_della_range_is_checked_alike_as_method_and_as_transform() -> None:
    message = r"density=0.1 and epsilon=0.5 give keep probabilities outside \(0, 1\]"
    with pytest.raises(ParamError, match=r"method 'della': " + message):
        get_method("della").normalize_params({"density": 0.1, "epsilon": 0.5}, 2)
    with pytest.raises(ParamError, match=r"transform 'della': " + message):
        build_transform("della", {"density": 0.1, "epsilon": 0.5})
    build_transform("della", {"density": 0.5, "epsilon": 0.9})  # keep probabilities in (0, 1]


def test_module_generators_do_not_depend_on_order() -> None:
    first = torch.rand(4, generator=module_generator(7, "model.layers.0.q_proj"))
    torch.rand(4, generator=module_generator(7, "model.layers.1.q_proj"))
    again = torch.rand(4, generator=module_generator(7, "model.layers.0.q_proj"))
    torch.testing.assert_close(first, again, rtol=0, atol=0)


def test_magnitude_mask_keeps_exactly_the_top_fraction() -> None:
    values = torch.randn(40, 25, generator=torch.Generator().manual_seed(0))
    mask = sparsify.magnitude_mask(values, 0.2)
    assert int(mask.sum()) == 200
    kept_min = values.abs()[mask].min()
    dropped_max = values.abs()[~mask].max()
    assert kept_min > dropped_max


def test_slerp_endpoints_and_breadcrumbs_drop_outliers() -> None:
    from merging_core.methods.slerp import slerp

    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 8, generator=generator), torch.randn(8, 8, generator=generator)
    torch.testing.assert_close(slerp([a, b], t=0.0), a)
    torch.testing.assert_close(slerp([a, b], t=1.0), b)
    crumbs = sparsify.breadcrumbs(a, density=0.5, gamma=0.1)
    top = a.abs().flatten().argsort(descending=True)
    assert (crumbs.flatten()[top[:6]] == 0).all()
    assert int((crumbs != 0).sum()) == 32


# --- SVD-based methods against dense reference computations -----------------------------------


def _factors(output, module):
    return [(a.modules[module].lora_B, a.modules[module].lora_A, a.modules[module].scaling)
            for a in output.adapters]


def test_tsv_matches_a_dense_reference(adapters) -> None:
    from merging_core.methods.lowrank import polar
    from merging_core.methods.tsv import tsv

    output = prepare_merge({"adapters": [str(p) for p in adapters.values()], "method": "tsv"})
    for module in output.modules:
        us, ss, vs = [], [], []
        for adapter in output.adapters:
            source = adapter.modules[module]
            u, s, vh = torch.linalg.svd(source.delta().double(), full_matrices=False)
            us.append(u[:, : source.rank])
            ss.append(s[: source.rank])
            vs.append(vh[: source.rank].T)
        expected = polar(torch.cat(us, 1)) @ torch.diag(torch.cat(ss)) @ polar(torch.cat(vs, 1)).T
        lora_B, lora_A = tsv(_factors(output, module), lam=0.5)
        torch.testing.assert_close((lora_B @ lora_A).double(), 0.5 * expected, rtol=1e-4, atol=1e-5)


def test_knots_matches_a_dense_reference(adapters) -> None:
    from merging_core.methods.knots import knots

    output = prepare_merge({"adapters": [str(p) for p in adapters.values()], "method": "knots"})
    for module in output.modules:
        deltas = [a.modules[module].delta().double() for a in output.adapters]
        u, s, vh = torch.linalg.svd(torch.cat(deltas, dim=1), full_matrices=False)
        rank = sum(a.modules[module].rank for a in output.adapters)
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
        parts = list(vh.split(deltas[0].shape[1], dim=1))
        merged_v = ties(parts, k=100)  # k=100: no trim, sign election + disjoint mean
        expected = u @ torch.diag(s) @ merged_v
        lora_B, lora_A = knots(_factors(output, module), k=100, lam=1.0)
        torch.testing.assert_close((lora_B @ lora_A).double(), expected, rtol=1e-4, atol=1e-5)


def test_tsv_decorrelates_tasks(adapters) -> None:
    from merging_core.methods.tsv import tsv

    output = prepare_merge({"adapters": [str(p) for p in adapters.values()], "method": "tsv"})
    module = "model.layers.0.mlp.up_proj"
    lora_B, _ = tsv(_factors(output, module))
    directions = lora_B / lora_B.norm(dim=0, keepdim=True)
    gram = directions.T @ directions
    torch.testing.assert_close(gram, torch.eye(gram.shape[0]), atol=1e-4, rtol=0)
