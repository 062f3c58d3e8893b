"""Resident-model evaluation on a tiny workspace: restore, heads, interference, subsets, index."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from merging_core import run_merge
from merging_core.config import EvalSubsetConfig
from merging_core.errors import Cancelled, ConfigError, EvaluationError
from merging_core.runtime.cancel import CancelToken
from merging_core.evaluation.evaluate import EvalSession, interference_delta, normalized_score
from merging_core.evaluation.evaluators import classification_metrics
from merging_core.runtime.index import read_index, update_results_index
from merging_core.evaluation.workspace import load_workspace

ROOT = Path(__file__).resolve().parents[1]


def _same(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> bool:
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.fixture
def session(tiny_session_factory, tmp_path):  # type: ignore[no-untyped-def]
    return tiny_session_factory(tmp_path / "artifacts")


def _merge(session, method: str = "ties", **params):  # type: ignore[no-untyped-def]
    return run_merge({"adapters": ["topic", "mood"], "method": method, "method_params": params},
                     task_registry=session.workspace.task_registry(),
                     artifacts_dir=session.root)


def test_apply_changes_weights_and_restore_is_bit_identical(session) -> None:
    before = session.holder.weights_fingerprint()
    result = _merge(session)
    session.holder.apply(result.output)
    assert not _same(before, session.holder.weights_fingerprint())
    session.holder.restore()
    assert _same(before, session.holder.weights_fingerprint())


def test_restore_after_an_exception_mid_evaluation(session, monkeypatch) -> None:
    before = session.holder.weights_fingerprint()
    result = _merge(session)
    calls = {"n": 0}
    original = session.holder.model.forward

    def failing_forward(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom in the middle of evaluation")
        return original(*args, **kwargs)

    monkeypatch.setattr(session.holder.model, "forward", failing_forward)
    with pytest.raises(RuntimeError, match="boom"):
        session.evaluate_merge(result.output, merge_tag=result.merge_tag)
    monkeypatch.undo()
    assert session.holder.is_pristine
    assert _same(before, session.holder.weights_fingerprint())


def test_restore_after_cancel_between_batches(session) -> None:
    before = session.holder.weights_fingerprint()
    result = _merge(session)
    cancel = CancelToken()

    def cancel_after_two_batches(done, total, message, extra):  # type: ignore[no-untyped-def]
        if done >= 2:
            cancel.cancel()

    with pytest.raises(Cancelled):
        with session.holder.applied(result.output, cancel):
            session.evaluate_task("topic", "test", None, cancel=cancel, progress=cancel_after_two_batches)
    assert _same(before, session.holder.weights_fingerprint())


def test_each_task_uses_its_own_head(session) -> None:
    before = session.holder.weights_fingerprint()
    topic = session.evaluate_task("topic", "test", None)
    mood = session.evaluate_task("mood", "test", None)
    assert set(topic.per_class) == {"books", "food", "music"}
    assert set(mood.per_class) == {"negative", "positive"}
    assert _same(before, session.holder.weights_fingerprint())


def test_reference_is_the_task_adapter_and_is_cached(session) -> None:
    reference = session.reference("topic", "test", None)
    cache = session.root / "topic" / "metrics" / "eval" / "test" / "reference" / "metrics.json"
    assert cache.is_file()
    stamp = cache.stat().st_mtime_ns
    assert session.reference("topic", "test", None).metrics == reference.metrics
    assert cache.stat().st_mtime_ns == stamp  # reused, not recomputed
    own = session.evaluate_output(session.task_output("topic"), ["topic"], "test", None)["topic"]
    assert own.metrics == reference.metrics


def test_reference_cache_follows_the_task_settings(session, tiny_workspace, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A cached reference is not reused once what it was measured on changes."""
    session.reference("topic", "test", None)
    cache = session.root / "topic" / "metrics" / "eval" / "test" / "reference" / "metrics.json"
    key = json.loads(cache.read_text())["key"]
    changed = yaml.safe_load(tiny_workspace.read_text())
    changed["tasks"]["topic"]["max_length"] = 8
    variant = tiny_workspace.with_name("workspace_max_length_8.yaml")
    variant.write_text(yaml.safe_dump(changed))
    other = EvalSession(load_workspace(variant), session.holder, session.root)
    other.reference("topic", "test", None)
    assert json.loads(cache.read_text())["key"] != key  # recomputed under the new settings


def test_saved_adapter_and_in_memory_give_the_same_metrics(session) -> None:
    merged = run_merge({"adapters": ["topic", "mood"], "method": "weighted_delta",
                        "method_params": {"lambda": 0.6}},
                       task_registry=session.workspace.task_registry(), artifacts_dir=session.root,
                       save=True)
    in_memory = session.evaluate_merge(merged.output, merge_tag=merged.merge_tag)
    saved = session.evaluate_saved(merged.adapter_path)
    for task in ("topic", "mood"):
        assert saved.tasks[task].merged.metrics == pytest.approx(in_memory.tasks[task].merged.metrics)
    assert (merged.run_dir / "eval_results_test.json").is_file()


def test_interference_sign_for_both_directions() -> None:
    assert interference_delta(0.8, 0.9, "higher") == pytest.approx(-0.1)
    assert interference_delta(0.95, 0.9, "higher") == pytest.approx(0.05)
    assert interference_delta(0.30, 0.25, "lower") == pytest.approx(-0.05)  # WER got worse
    assert interference_delta(0.20, 0.25, "lower") == pytest.approx(0.05)  # WER got better
    assert normalized_score(0.45, 0.9, "higher") == pytest.approx(0.5)
    assert normalized_score(0.5, 0.25, "lower") == pytest.approx(0.5)


def test_evaluation_outputs_follow_the_seed_layout(session) -> None:
    result = _merge(session)
    evaluation = session.evaluate_merge(result.output, merge_tag=result.merge_tag, run_dir=result.run_dir)
    combo = session.root / "merged" / "ties" / "mood_topic"
    tag = result.merge_tag
    assert (combo / "eval" / "test" / f"eval_results_{tag}_test.json").is_file()
    assert (result.run_dir / "eval_results_test.json").is_file()
    link = session.root / "topic" / "metrics" / "eval" / "test" / "merged" / "mood" / tag / "metrics.json"
    assert link.is_symlink() and not Path(link.readlink()).is_absolute()
    assert json.loads(link.read_text())["interference_delta"] == evaluation.tasks["topic"].interference_delta
    entries = read_index(combo / "eval" / "index.json")
    assert [e["id"] for e in entries] == [evaluation.id]
    assert entries[0]["objective_min_delta"] == evaluation.objective
    assert evaluation.tasks["topic"].base is not None


def test_classification_metrics_per_class_and_macro_f1() -> None:
    metrics, per_class = classification_metrics(["a", "a", "b", "b"], ["a", "b", "b", "b"], ["a", "b"])
    assert metrics["accuracy"] == 0.75
    assert per_class["b"] == {"support": 3, "correct": 2, "predicted": 2}
    assert metrics["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)


def test_missing_head_is_a_clear_error(session) -> None:
    session.adapter("topic").heads.clear()  # this session's cached copy only
    with pytest.raises(EvaluationError, match="no classification head"):
        session.head("topic")


SUBSET_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from merging_core.config import EvalSubsetConfig
    from merging_core.evaluation.data import load_task_data
    from merging_core.evaluation.subsets import select_indices, subset_spec
    data = load_task_data(__import__("pathlib").Path(sys.argv[1]), text_column="text", label_column="label")
    config = EvalSubsetConfig(seed=3, shuffle=True, stratified=True, max_samples=10)
    print(json.dumps(select_indices(data, subset_spec(config, "topic"), "topic/test")))
    """
)


def test_subset_is_identical_across_processes(tiny_workspace, session) -> None:
    data_file = tiny_workspace.parent / "data" / "topic" / "test.jsonl"
    runs = [
        subprocess.run([sys.executable, "-c", SUBSET_SCRIPT, str(data_file)], capture_output=True,
                       text=True, check=True, env={"PYTHONHASHSEED": str(seed), "PATH": ""}).stdout
        for seed in (1, 2)
    ]
    assert runs[0] == runs[1]
    indices = json.loads(runs[0])
    assert len(indices) == 10
    subset = EvalSubsetConfig(seed=3, shuffle=True, stratified=True, max_samples=10)
    data, tag = session.task_data("topic", "test", subset)
    assert tag and len(data) == 10
    cached = session.root / "subsets" / "topic" / "test" / f"{tag}.json"
    assert json.loads(cached.read_text())["indices"] == indices
    labels = data.labels or []
    assert sorted(labels.count(label) for label in set(labels)) == [3, 3, 4]  # stratified


def test_subset_results_are_namespaced_apart(session) -> None:
    result = _merge(session)
    subset = EvalSubsetConfig(max_samples=12)
    on_subset = session.evaluate_merge(result.output, merge_tag=result.merge_tag, subset=subset)
    full = session.evaluate_merge(result.output, merge_tag=result.merge_tag)
    assert on_subset.subset and full.subset is None
    assert on_subset.results_file != full.results_file
    assert on_subset.subset in str(on_subset.results_file)
    assert on_subset.tasks["topic"].merged.num_samples == 12


APPEND_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from merging_core.runtime.index import update_results_index
    for i in range(int(sys.argv[3])):
        update_results_index(Path(sys.argv[1]), {"id": f"{sys.argv[2]}-{i}", "value": i})
    """
)


def test_index_is_append_only_and_concurrent_appends_lose_nothing(tmp_path) -> None:
    index = tmp_path / "eval" / "index.json"
    update_results_index(index, {"id": "first", "value": -1})
    writers = [subprocess.Popen([sys.executable, "-c", APPEND_SCRIPT, str(index), name, "25"])
               for name in ("a", "b")]
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    entries = read_index(index)
    ids = [e["id"] for e in entries]
    assert ids[0] == "first"
    assert len(ids) == 51 and len(set(ids)) == 51
    assert not update_results_index(index, {"id": "first", "value": 99})  # idempotent by id
    assert read_index(index)[0]["value"] == -1


def test_csv_and_parquet_load_like_jsonl(tmp_path) -> None:
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    from merging_core.evaluation.data import load_task_data

    rows = [{"sentence": f"text {i}, with a comma", "intent": ["a", "b"][i % 2]} for i in range(5)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with (tmp_path / "d.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["sentence", "intent"])
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    loaded = [load_task_data(tmp_path / f"d.{ext}", text_column="sentence", label_column="intent")
              for ext in ("jsonl", "csv", "parquet")]
    for data in loaded:
        assert data.texts == [r["sentence"] for r in rows] and data.labels == [r["intent"] for r in rows]
    with pytest.raises(ConfigError, match="label"):
        load_task_data(tmp_path / "d.csv", text_column="sentence", label_column="label")


def test_eval_subset_per_task_overrides(session) -> None:
    subset = EvalSubsetConfig(max_samples=10, seed=3, per_task={"topic": {"max_samples": 4, "seed": 5}})
    topic, _ = session.task_data("topic", "test", subset)
    mood, _ = session.task_data("mood", "test", subset)
    assert len(topic) == 4 and len(mood) == 10
    plain, _ = session.task_data("topic", "test", EvalSubsetConfig(max_samples=4, seed=5))
    assert topic.texts == plain.texts  # the override is exactly that task's own subset


def test_index_appends_in_place_and_repairs_a_torn_append(tmp_path: Path) -> None:
    """An append writes only its entry (the file is not rewritten: same inode); a writer that
    died mid-append leaves an unfinished line that readers drop and the next append repairs."""
    index = tmp_path / "eval" / "index.json"
    assert update_results_index(index, {"id": "a", "n": 1})
    inode = index.stat().st_ino
    for name in "bcd":
        assert update_results_index(index, {"id": name, "n": 1})
    assert index.stat().st_ino == inode
    assert [e["id"] for e in json.loads(index.read_text())] == ["a", "b", "c", "d"]
    assert not update_results_index(index, {"id": "c", "n": 2})  # an id already indexed
    with index.open("r+b") as handle:  # what a crash in the middle of an append leaves
        handle.seek(-3, 2)
        handle.write(b',\n{"id": "e", "n"')
    assert [e["id"] for e in read_index(index)] == ["a", "b", "c", "d"]
    assert update_results_index(index, {"id": "f", "n": 1})
    assert [e["id"] for e in json.loads(index.read_text())] == ["a", "b", "c", "d", "f"]
