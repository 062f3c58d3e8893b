"""AdaMerging on the tiny workspace."""

from __future__ import annotations

import json

import pytest
import torch

from merging_core import prepare_merge, run_merge
from merging_core.errors import Cancelled, ParamError
from merging_core.runtime.cancel import CancelToken
from merging_core.plugins.adamerging import AdaMergingTrainer
from merging_core.plugins.optimizers import build_optimizer


@pytest.fixture
def session(tiny_session_factory, tmp_path):  # type: ignore[no-untyped-def]
    return tiny_session_factory(tmp_path / "artifacts")


def _trainer(session, **overrides):  # type: ignore[no-untyped-def]
    output = prepare_merge({"adapters": ["topic", "mood"], "method": "task_vector"},
                           task_registry=session.workspace.task_registry(),
                           adapter_cache=session.adapter_cache)
    _, params = build_optimizer("adamerging", {"batch_size": 6, **overrides})
    return AdaMergingTrainer(session, output.adapters, output.modules, ["topic", "mood"], params)


def _same(a, b) -> bool:  # type: ignore[no-untyped-def]
    return all(torch.equal(a[k], b[k]) for k in a)


def test_both_merge_impls_give_the_same_loss_and_gradients(session) -> None:
    trainer = _trainer(session)
    with torch.no_grad():
        trainer.lambdas.values.copy_(torch.tensor([[0.2, 0.7], [0.9, 0.4]]))
    batches = {task: trainer.batch(task) for task in trainer.tasks}
    results = {}
    with session.holder.frozen():
        for impl in ("streaming_parametrize", "functional_clone_legacy"):
            trainer.lambdas.values.grad = None
            loss = trainer.loss(batches, impl)
            loss.backward()
            results[impl] = (float(loss.detach()), trainer.lambdas.values.grad.clone())
    (loss_a, grad_a), (loss_b, grad_b) = results.values()
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    torch.testing.assert_close(grad_a, grad_b, rtol=1e-4, atol=1e-7)
    assert grad_a.abs().sum() > 0


def test_cpu_stream_and_gpu_cache_agree(session) -> None:
    losses, grads = [], []
    for residency in ("cpu_stream", "gpu_cache"):  # gpu_cache stays on the CPU without CUDA
        trainer = _trainer(session, delta_residency=residency)
        batches = {task: trainer.batch(task) for task in trainer.tasks}
        with session.holder.frozen():
            loss = trainer.loss(batches)
            loss.backward()
        losses.append(float(loss.detach()))
        grads.append(trainer.lambdas.values.grad.clone())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)
    assert grads[0].abs().sum() > 0


def test_run_learns_lambdas_writes_them_and_leaves_weights_identical(session) -> None:
    before = session.holder.weights_fingerprint()
    result = run_merge(
        {"adapters": ["topic", "mood"], "method": "task_vector",
         "optimizer": {"name": "adamerging", "params": {"steps": 4, "batch_size": 6, "lr": 0.05}}},
        task_registry=session.workspace.task_registry(), artifacts_dir=session.root, session=session,
    )
    assert _same(before, session.holder.weights_fingerprint())
    assert all(p.requires_grad for p in session.holder.model.parameters())
    learned = json.loads((result.run_dir / "adamerging_lambdas.json").read_text())
    assert learned["layers"] == [0, 1] and len(learned["entropy"]) == 4
    assert (result.run_dir / "adamerging_entropy.png").read_bytes()[:4] == b"\x89PNG"
    assert result.output.policy.kind == "per_layer"
    assert result.output.policy.overrides[0] != [0.3, 0.3]  # moved from the initial value
    for values in result.output.policy.overrides.values():
        assert all(0.0 <= v <= 1.0 for v in values)
    module = next(m for m in result.output.modules if ".layer.1." in m)
    expected = sum(w * a.modules[module].delta()
                   for w, a in zip(result.output.policy.overrides[1], result.output.adapters))
    torch.testing.assert_close(result.output.delta(module), expected)


def test_cancelled_run_leaves_weights_identical(session) -> None:
    before = session.holder.weights_fingerprint()
    cancel = CancelToken()
    with pytest.raises(Cancelled):
        run_merge(
            {"adapters": ["topic", "mood"], "method": "task_vector",
             "optimizer": {"name": "adamerging", "params": {"steps": 50, "batch_size": 6}}},
            task_registry=session.workspace.task_registry(), artifacts_dir=session.root,
            session=session, cancel=cancel,
            progress=lambda done, total, message, extra: cancel.cancel() if done >= 2 else None,
        )
    assert _same(before, session.holder.weights_fingerprint())
    assert not list(session.root.rglob("run_*"))


def test_force_cpu_loads_on_the_cpu_in_float32(tiny_workspace, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A bfloat16 resident model: force_cpu trains on a fresh CPU float32 copy and leaves the
    resident model as it was."""
    from merging_core.evaluation.evaluate import EvalSession
    from merging_core.evaluation.holder import ModelHolder
    from merging_core.evaluation.workspace import load_workspace
    from merging_core.plugins import adamerging

    session = EvalSession.from_workspace(load_workspace(tiny_workspace), tmp_path / "artifacts",
                                         device="cpu", dtype="bfloat16")
    assert session.holder.dtype == torch.bfloat16
    resident = session.holder.weights_fingerprint()
    captured = {}
    original = adamerging.AdaMergingTrainer.__init__

    def spy(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        original(self, *args, **kwargs)
        captured["holder"] = self.holder

    loads = ModelHolder.load_count
    adamerging.AdaMergingTrainer.__init__ = spy  # type: ignore[method-assign]
    try:
        result = run_merge({"adapters": ["topic", "mood"], "method": "task_vector",
                            "optimizer": {"name": "adamerging", "params": {"steps": 2, "force_cpu": True}}},
                           task_registry=session.workspace.task_registry(), artifacts_dir=session.root,
                           session=session)
    finally:
        adamerging.AdaMergingTrainer.__init__ = original  # type: ignore[method-assign]
    holder = captured["holder"]
    assert holder is not session.holder and ModelHolder.load_count == loads + 1
    assert holder.device.type == "cpu" and holder.dtype == torch.float32
    assert {p.dtype for p in holder.model.parameters()} == {torch.float32}
    assert {p.device.type for p in holder.model.parameters()} == {"cpu"}
    assert (result.run_dir / "adamerging_lambdas.json").is_file()
    assert session.holder.dtype == torch.bfloat16 and _same(resident, session.holder.weights_fingerprint())


def test_refusals(session) -> None:
    registry = session.workspace.task_registry()
    with pytest.raises(ParamError, match="use method task_vector or weighted_delta, not 'ties'"):
        run_merge({"adapters": ["topic", "mood"], "method": "ties", "optimizer": "adamerging"},
                  task_registry=registry, artifacts_dir=session.root, session=session)
    with pytest.raises(ParamError, match="needs the base model and task data"):
        run_merge({"adapters": ["topic", "mood"], "method": "task_vector", "optimizer": "adamerging"},
                  task_registry=registry, artifacts_dir=session.root)
    with pytest.raises(ParamError, match="merge_impl' must be one of streaming_parametrize"):
        build_optimizer("adamerging", {"merge_impl": "fast"})
    with pytest.raises(ParamError, match="init_lambda must lie within"):
        build_optimizer("adamerging", {"init_lambda": 2.0})


def test_adapters_that_are_not_workspace_tasks_are_refused(session) -> None:
    """AdaMerging needs each adapter's task (its unlabeled inputs and evaluator)."""
    registry = {**session.workspace.task_registry(), "stranger": session.workspace.adapter_path("mood")}
    with pytest.raises(ParamError, match="task 'stranger' is not a workspace task"):
        run_merge({"adapters": ["topic", "stranger"], "method": "task_vector", "optimizer": "adamerging"},
                  task_registry=registry, artifacts_dir=session.root, session=session)
