"""Sweeps with several trials in flight (what the Ray executor's actors do), on the tiny
workspace, with a runner that finishes trials out of order: the same trials as one at a time,
a resume after a gap in the trial files, and Bayesian batches with pending points."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from merging_core.config import parse_merge_config
from merging_core.errors import Cancelled
from merging_core.evaluation.evaluate import EvalSession
from merging_core.runtime.cancel import CancelToken
from merging_core.runtime.index import read_index
from merging_core.search import Sweep, plan_sweep
from merging_core.search.proposers import suggest_batch
from merging_core.search.sweep import TrialOutcome, TrialRequest, compute_trial

GRID = {"adapters": ["topic", "mood"], "method": "weighted_delta", "eval_subset": {"max_samples": 12},
        "search": {"type": "grid", "grid": {"lambda": [i / 8 for i in range(8)]}}}
BAYES = {"adapters": ["topic", "mood"], "method": "weighted_delta", "eval_subset": {"max_samples": 12},
         "search": {"type": "bayes", "budget": 7, "init_points": 3, "seed": 7,
                    "space": {"lambda": {"min": 0.0, "max": 1.0, "per_adapter": True}}}}


class LastFirstTrials:
    """`width` trials in flight; the last submitted finishes first (real trials, computed on
    the session's model when waited for). `fail_after` finished trials, it raises Cancelled,
    as a crash would stop the sweep with trials still in flight."""

    def __init__(self, session: EvalSession, width: int, fail_after: int | None = None) -> None:
        self.session, self.width, self.fail_after = session, width, fail_after
        self.queue: list[TrialRequest] = []
        self.finished = 0
        self.widest = 0

    def capacity(self, in_flight: int, cancel: CancelToken | None) -> int:
        return self.width - in_flight

    def submit(self, request: TrialRequest) -> None:
        self.queue.append(request)
        self.widest = max(self.widest, len(self.queue))

    def wait(self, cancel: CancelToken | None) -> tuple[TrialRequest, TrialOutcome]:
        if self.fail_after is not None and self.finished >= self.fail_after:
            raise Cancelled("the sweep's process died")
        request = self.queue.pop()
        self.finished += 1
        return request, compute_trial(self.session, request, cancel)


def _sweep(config: dict[str, Any], session: EvalSession, runner: Any | None = None) -> Sweep:
    plan = plan_sweep(parse_merge_config(config), session.workspace, adapter_cache=session.adapter_cache)
    if runner is None:
        return Sweep(plan, session)
    return Sweep(plan, root=session.root, writer=session.writer, runner=runner)


def _trial_files(sweep: Sweep) -> dict[str, bytes]:
    directory = sweep._trial_path(0).parent
    return {p.name: p.read_bytes() for p in sorted(directory.glob("trial_*.json"))}


def test_out_of_order_trials_equal_one_at_a_time_and_resume_across_a_gap(tiny_session_factory, tmp_path: Path) -> None:
    sequential = _sweep(GRID, tiny_session_factory(tmp_path / "one")).run()

    session = tiny_session_factory(tmp_path / "three")
    runner = LastFirstTrials(session, width=3)
    parallel = _sweep(GRID, session, runner).run()
    assert runner.widest == 3
    assert [t.point for t in parallel.trials] == [t.point for t in sequential.trials]
    assert [t.objective for t in parallel.trials] == pytest.approx([t.objective for t in sequential.trials], abs=1e-6)

    # Stopped with trials in flight: the files on disk have a gap (later trials finished first).
    session = tiny_session_factory(tmp_path / "crash")
    crashed = _sweep(GRID, session, LastFirstTrials(session, width=3, fail_after=4))
    with pytest.raises(Cancelled):
        crashed.run()
    before = _trial_files(crashed)
    indices = sorted(int(name[6:10]) for name in before)
    assert len(indices) == 4 and indices != list(range(4)), indices  # a gap
    resumed = _sweep(GRID, session).run()
    assert resumed.resumed_trials == 4
    assert [t.index for t in resumed.trials] == list(range(8))
    assert [t.objective for t in resumed.trials] == pytest.approx([t.objective for t in sequential.trials], abs=1e-6)
    after = _trial_files(crashed)
    assert all(after[name] == data for name, data in before.items())  # none run twice
    index = read_index(resumed.summary_path.parent.parent / "eval" / "index.json")
    assert sorted(e["trial"] for e in index) == list(range(8))  # no duplicate entry
    summary = json.loads(resumed.summary_path.read_text())
    assert summary["complete"] and summary["num_trials"] == 8


def test_bayes_in_batches_keeps_its_sobol_points_and_proposes_around_pending_ones(
    tiny_session_factory, tmp_path: Path,
) -> None:
    sequential = _sweep(BAYES, tiny_session_factory(tmp_path / "one")).run()
    session = tiny_session_factory(tmp_path / "two")
    parallel = _sweep(BAYES, session, LastFirstTrials(session, width=2)).run()
    # The first init_points (Sobol) points do not depend on any result: identical.
    assert [t.point for t in parallel.trials[:3]] == [t.point for t in sequential.trials[:3]]
    assert [t.source for t in parallel.trials] == ["sobol"] * 3 + ["gp"] * 4
    points = [tuple(sorted(t.point.items())) for t in parallel.trials]
    assert len(set(points)) == len(points) and all(len(point) == 2 for point in points)  # one lambda an adapter
    assert all(0.0 <= value <= 1.0 for point in points for _, value in point)


def test_a_batch_of_gp_points_avoids_the_pending_ones() -> None:
    observed_x = [[0.1, 0.1], [0.9, 0.2], [0.5, 0.8], [0.3, 0.6]]
    observed_y = [0.1, 0.3, 0.6, 0.4]
    pending = [[0.55, 0.85]]
    for acquisition in ("ei", "logei", "qlognei"):  # the analytic ones go Monte Carlo
        batch = suggest_batch(observed_x, observed_y, 2, seed=3, q=2, acquisition=acquisition, pending=pending)
        assert len(batch) == 2 and batch[0] != batch[1]
        assert all(0.0 <= v <= 1.0 for point in batch for v in point)
        assert all(point != pending[0] for point in batch)
