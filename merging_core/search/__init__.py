"""Searching merge coefficients: the space, the proposers, warm start, and sweeps."""

# Registers `optimizer: bayes` (a search, then a merge with its best point).
from merging_core.search import optimizer as _optimizer  # noqa: F401
from merging_core.search.proposers import BayesProposer, GridProposer, Proposal, Proposer, make_proposer
from merging_core.search.sweep import Sweep, SweepPlan, plan_sweep, run_sweep
from merging_core.search.trials import SweepResult, Trial

__all__ = [
    "BayesProposer",
    "GridProposer",
    "Proposal",
    "Proposer",
    "Sweep",
    "SweepPlan",
    "SweepResult",
    "Trial",
    "make_proposer",
    "plan_sweep",
    "run_sweep",
]
