"""What an optimizer is and what it may touch.

An optimizer sets the lambda policy of a merge before it is built (AdaMerging learns per-layer
lambdas). It is declared as data (`OptimizerSpec`): its parameters, which methods it works
with, which task evaluators it needs, and whether it sets the lambdas itself, so that a plan
can be checked without running it. It runs only when a plan is executed, against a typed
`OptimizerSession`: the resident model through its holder, and each task's unlabeled inputs.

This module imports nothing above `plugins/`; the evaluation session and the model holder
satisfy the protocols below structurally.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from merging_core.adapters import LoraAdapter
from merging_core.errors import ParamError
from merging_core.params import ParamSpec, Params
from merging_core.policies import LambdaPolicy
from merging_core.runtime.cancel import CancelToken, Progress

# hook(module, inputs, output) -> new output, as torch's forward hooks.
ForwardHook = Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], torch.Tensor]


def mean_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the entropy of softmax(logits) along the last dimension (AdaMerging's
    objective: the model's uncertainty about its own predictions)."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return -(log_probs.exp() * log_probs).sum(dim=-1).mean()


class ResidentModel(Protocol):
    """The model holder as an optimizer sees it: every change goes through a context manager
    that undoes it on exit (see `merging_core.evaluation.holder.ModelHolder`)."""

    device: torch.device
    dtype: torch.dtype
    model: nn.Module
    tokenizer: Any

    def head(self, tensors: Mapping[str, torch.Tensor]) -> AbstractContextManager[None]: ...

    def hooked(self, hooks: Mapping[str, ForwardHook]) -> AbstractContextManager[None]: ...

    def frozen(self) -> AbstractContextManager[None]: ...

    def cpu_float32(self) -> AbstractContextManager[ResidentModel]: ...


class OptimizerSession(Protocol):
    """The resident model and the workspace's task data (an `EvalSession` is one)."""

    @property
    def holder(self) -> ResidentModel: ...

    def evaluator_of(self, task: str) -> str: ...

    def max_length(self, task: str) -> int: ...

    def unlabeled_texts(self, task: str, split: str) -> list[str]: ...

    def head(self, task: str) -> Mapping[str, torch.Tensor]: ...

    def prediction_entropy(self, task: str, texts: Sequence[str], holder: ResidentModel) -> torch.Tensor:
        """The mean entropy of the model's own predictions for task t on `texts`, as its
        evaluator defines them (differentiable): AdaMerging's objective."""
        ...


@dataclass(frozen=True)
class OptimizerContext:
    """What an optimizer may look at when it runs."""

    method: str
    method_params: Params
    policy: LambdaPolicy
    adapters: Sequence[LoraAdapter]
    modules: Sequence[str]
    session: OptimizerSession | None = None
    cancel: CancelToken | None = None
    progress: Progress | None = None


@dataclass
class OptimizerResult:
    """The policy to merge with, and files for the run bundle (name -> JSON-able or bytes).

    An optimizer that chooses the method params too (`bayes`) sets `variant`: the chosen
    (method_params, lambda_policy) in request form, which the runner re-plans and validates
    like a sweep's trial, and which then replace `policy`."""

    policy: LambdaPolicy
    artifacts: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    variant: tuple[dict[str, Any], dict[str, Any]] | None = None


@dataclass(frozen=True)
class OptimizerSpec:
    """A registered optimizer. `methods` and `evaluators` (None: any) are checked at planning
    time; `initial_lambda(params, n_adapters)` is the lambda a merge starts from when the
    optimizer sets the lambdas and the request gives none."""

    name: str
    doc: str
    params: tuple[ParamSpec, ...]
    run: Callable[[OptimizerContext, Params], OptimizerResult]
    params_validator: Callable[[Params], None] | None = None
    methods: tuple[str, ...] | None = None
    evaluators: tuple[str, ...] | None = None
    initial_lambda: Callable[[Params, int], list[float]] | None = None
    # adapters of tasks scored by these evaluators must bring their own head (modules_to_save)
    heads_for: tuple[str, ...] = ()
    needs_tasks: bool = False  # every adapter must be a workspace task (any evaluator)

    @property
    def sets_lambdas(self) -> bool:
        return self.initial_lambda is not None

    def check(self, method: str, tasks: Sequence[str],
              task_evaluators: Mapping[str, str] | None) -> None:
        """Refuse a plan this optimizer cannot run (without running anything)."""
        if self.methods is not None and method not in self.methods:
            raise ParamError(
                f"optimizer {self.name!r} learns per-layer task-arithmetic coefficients; use "
                f"method {' or '.join(self.methods)}, not {method!r}"
            )
        if task_evaluators is None:
            return
        if self.needs_tasks:
            strangers = [task for task in tasks if task not in task_evaluators]
            if strangers:
                raise ParamError(f"optimizer {self.name!r} scores each adapter on its workspace task; "
                                 f"{', '.join(map(repr, strangers))} is not a workspace task")
        if self.evaluators is None:
            return
        for task in tasks:
            evaluator = task_evaluators.get(task)
            if evaluator not in self.evaluators:
                what = f"uses evaluator {evaluator!r}" if evaluator else "is not a workspace task"
                raise ParamError(
                    f"optimizer {self.name!r} works on workspace tasks scored by "
                    f"{', '.join(self.evaluators)}; task {task!r} {what}"
                )

    def check_adapters(self, adapters: Sequence[LoraAdapter],
                       task_evaluators: Mapping[str, str] | None = None) -> None:
        """Refuse adapters this optimizer cannot use (checked on the loaded factors and heads):
        those of tasks whose evaluator needs a head and that bring none."""
        if not self.heads_for or task_evaluators is None:
            return
        headless = [adapter.name for adapter in adapters
                    if task_evaluators.get(adapter.name) in self.heads_for and not adapter.heads]
        if headless:
            raise ParamError(
                f"optimizer {self.name!r} minimises the entropy of each task's own head; adapter(s) "
                f"{', '.join(headless)} have no head (modules_to_save)"
            )

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "doc": self.doc, "params": [p.describe() for p in self.params]}

