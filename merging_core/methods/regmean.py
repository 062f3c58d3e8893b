"""RegMean on LoRA: the merge that best reproduces every task's layer outputs on its own inputs.

Jin et al., ICLR 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models". For a
linear module with inputs X_i under task i's own adapter and G_i = X_i^T X_i (in x in), the
merged weight minimising sum_i ||X_i W^T - X_i W_i^T||^2 is

    W^T = W0^T + (sum_j G_j)^-1 sum_i G_i dW_i^T,

with each G_i's off-diagonal entries scaled by `alpha` first (the paper's regularisation:
G_i <- alpha G_i + (1 - alpha) diag(G_i)). For LoRA deltas dW_i = s_i B_i A_i this is exactly

    dW = sum_i s_i B_i M_i^T,    M_i = (sum_j G_j)^-1 G_i A_i^T   (in x r_i),

a LoRA of rank sum r_i: A = [M_1^T; ...; M_n^T], B = [s_1 B_1 | ... | s_n B_n], so nothing is
approximated and no dense delta is formed. `lambda` scales the merged delta, or, as a list, each
task's part of it: dW = sum_i lambda_i s_i B_i M_i^T. `task_weights` w_i weigh the tasks in the
objective sum_i w_i ||X_i (W - W_i)^T||^2, i.e. G_i is taken as w_i G_i in both sums. Both stay
exact at the same rank. The solve is a Cholesky factorisation in float64; when the sum is
singular (Cholesky fails) a ridge eps * mean(diag) * I is added, eps growing from `EPS_START` by
`EPS_GROWTH` until it succeeds, and the eps used is returned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from merging_core.methods.linear import per_adapter

EPS_START = 1e-6  # first relative ridge tried when the Gram sum is singular
EPS_GROWTH = 10.0
EPS_LIMIT = 1e3  # a ridge this large means the Grams are not a usable Gram matrix


@dataclass(frozen=True)
class RegMeanMerge:
    """The merged LoRA factors (scaling 1) and the relative ridge the solve needed (0: none)."""

    lora_B: torch.Tensor
    lora_A: torch.Tensor
    eps: float


def scale_off_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * G + (1 - alpha) * diag(G): the diagonal kept, the off-diagonal scaled by alpha."""
    return gram * alpha + torch.diag(torch.diagonal(gram)) * (1.0 - alpha)


def regularized_cholesky(
    matrix: torch.Tensor, eps_start: float = EPS_START
) -> tuple[torch.Tensor, float]:
    """The lower Cholesky factor of a symmetric `matrix`, or of matrix + eps * mean(diag) * I for
    the smallest eps = eps_start * EPS_GROWTH^k that makes it positive definite; returns the
    factor and eps (0.0 when no ridge was needed)."""
    if not bool(torch.isfinite(matrix).all()):
        raise ValueError("grams: the Gram matrices hold NaN or Inf")
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) == 0:
        return factor, 0.0
    scale = float(torch.diagonal(matrix).mean())
    if scale <= 0.0:
        scale = 1.0  # a module that saw only zero inputs: any ridge makes the solve well posed
    identity = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    eps = eps_start
    while eps <= EPS_LIMIT:
        factor, info = torch.linalg.cholesky_ex(matrix + (eps * scale) * identity)
        if int(info) == 0:
            return factor, eps
        eps *= EPS_GROWTH
    raise ValueError(f"grams: the Gram sum stays singular up to a relative ridge of {EPS_LIMIT:g}")


def regmean(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
    grams: Sequence[torch.Tensor],
    *,
    alpha: float = 0.9,
    lam: float | Sequence[float] = 1.0,
    task_weights: float | Sequence[float] = 1.0,
    eps_start: float = EPS_START,
) -> RegMeanMerge:
    """Merge (B_i, A_i, scaling_i) triples with each task's raw Gram G_i (in x in) of the
    module's inputs; returns (B, A) of rank sum r_i, scaling 1, and the ridge. A scalar `lam`
    scales the merged delta; a list scales each task's part (task i's B_i by lam_i)."""
    if len(factors) != len(grams):
        raise ValueError(f"grams: {len(grams)} Gram matrices for {len(factors)} adapters")
    weights = per_adapter(lam, len(factors))
    importance = per_adapter(task_weights, len(factors), "task_weights")
    if min(importance) < 0.0 or max(importance) <= 0.0:
        raise ValueError(f"task_weights: weights must be >= 0 and not all 0, got {importance}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: must lie in [0, 1], got {alpha}")
    in_features = factors[0][1].shape[1]
    for index, gram in enumerate(grams):
        if gram.shape != (in_features, in_features):
            raise ValueError(
                f"grams: adapter {index}'s Gram is {tuple(gram.shape)}, the module takes "
                f"{in_features} inputs"
            )
    scaled = [scale_off_diagonal(gram.to(torch.float64), alpha) * weight
              for gram, weight in zip(grams, importance)]
    cholesky, eps = regularized_cholesky(torch.stack(scaled).sum(dim=0), eps_start)
    device = cholesky.device
    # Every M_i at once: one solve against the side-by-side right-hand sides G_i A_i^T.
    rhs = torch.cat(
        [gram @ lora_A.to(device, torch.float64).T for gram, (_, lora_A, _) in zip(scaled, factors)],
        dim=1,
    )
    solved = torch.cholesky_solve(rhs, cholesky)  # in x sum r_i
    dtype = torch.promote_types(factors[0][1].dtype, torch.float32)
    out_device = factors[0][1].device
    lora_A = solved.T.to(out_device, dtype).contiguous()
    lora_B = torch.cat(
        [lora_B.to(dtype) * (scaling * weight) for (lora_B, _, scaling), weight in zip(factors, weights)],
        dim=1,
    ).contiguous()
    return RegMeanMerge(lora_B=lora_B, lora_A=lora_A, eps=eps)
