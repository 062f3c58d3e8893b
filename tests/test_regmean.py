"""RegMean on LoRA: the exact factor form against the dense closed form, the ridge for singular
Gram sums, saving, Gram collection on a causal-LM task (prompt positions only), the Gram cache,
refusals, RegMean++ (each layer's Grams through the merged earlier layers), and a merge with
evaluation through the real service."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from merging_core import prepare_merge, run_merge
from merging_core.engine import get_method
from merging_core.engine.merge import MergeOutput
from merging_core.engine.plan import plan_merge
from merging_core.errors import ParamError
from merging_core.evaluation.evaluate import EvalSession
from merging_core.evaluation.grams import prompt_token_ids, select_rows
from merging_core.evaluation.workspace import load_workspace
from merging_core.methods.regmean import EPS_START, regmean
from merging_core.runtime.paths import RUN_METADATA_FILE

WORDS = ["yes", "no", "red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "sky", "sea"]
MODULE = "model.layers.1.self_attn.q_proj"


@pytest.fixture(autouse=True)
def one_thread():  # type: ignore[no-untyped-def]
    """These tests do many tiny matrix products, which several threads only slow down (by orders
    of magnitude on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


def _dense_regmean(deltas: list[torch.Tensor], grams: list[torch.Tensor], alpha: float,
                   lam: float | list[float], ridge: float = 0.0,
                   task_weights: list[float] | None = None) -> torch.Tensor:
    """The paper's closed form on dense deltas: W^T - W0^T = (sum G)^-1 sum G_i dW_i^T (with a
    list `lam`, task i's term scaled by lam_i; with task weights, G_i taken as w_i G_i)."""
    weights = lam if isinstance(lam, list) else [lam] * len(deltas)
    importance = task_weights or [1.0] * len(deltas)
    scaled = [w * (alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g))) for w, g in zip(importance, grams)]
    total = sum(scaled)
    total = total + ridge * torch.diagonal(total).mean() * torch.eye(total.shape[0], dtype=total.dtype)
    rhs = sum(w * g @ d.double().T for w, g, d in zip(weights, scaled, deltas))
    return torch.linalg.solve(total, rhs).T


def _gram(rows: int, features: int, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(rows, features, generator=generator, dtype=torch.float64)
    x = x * torch.rand(features, generator=generator, dtype=torch.float64) * 3  # unequal scales
    return x.T @ x


class FakeGrams:
    """A Gram source of fixed random Grams (the real one is tested below, on the model)."""

    def __init__(self, by_module: dict[str, list[torch.Tensor]]) -> None:
        self.by_module = by_module

    def grams(self, module: str) -> list[torch.Tensor]:
        return self.by_module[module]

    def describe(self) -> dict[str, Any]:
        return {"fake": True}

    def prepare(self, merged_delta: Any) -> None:
        pass


@pytest.mark.parametrize("alpha, lam, task_weights", [
    (1.0, 1.0, None), (0.9, 1.0, None), (0.3, 0.7, None), (0.9, [1.3, 0.6, 1.0], [2.0, 0.5, 1.0])])
def test_factor_form_equals_dense_closed_form(adapters: dict[str, Path], alpha: float,
                                              lam: float | list[float], task_weights: list[float] | None) -> None:
    """Real adapters of different ranks (4, 8 with rsLoRA, 4 and 2 with alpha_pattern): the saved
    LoRA of rank sum r_i equals the dense closed form to 1e-5 relative Frobenius error, with one
    lambda or one per adapter, and with task weights."""
    output = prepare_merge({"adapters": [str(p) for p in adapters.values()], "method": "task_vector"})
    generator = torch.Generator().manual_seed(0)
    grams = {m: [_gram(40, output.adapters[0].modules[m].shape[1], generator) for _ in output.adapters]
             for m in output.modules}
    merged = MergeOutput(method=get_method("regmean"), adapters=output.adapters, modules=output.modules,
                         left_out={}, params={"alpha": alpha, "lambda": lam, "task_weights": task_weights or 1.0,
                                              "samples_per_task": 1, "split": "train", "seed": 0},
                         policy=output.policy, grams=FakeGrams(grams))
    ranks = {a.modules[MODULE].rank for a in output.adapters}
    assert ranks == {2, 4, 8}
    for module in output.modules:
        result = merged.merge_module(module)
        lora_B, lora_A = result.factors  # type: ignore[misc]
        assert lora_A.shape[0] == sum(a.modules[module].rank for a in output.adapters)
        expected = _dense_regmean([a.modules[module].delta() for a in output.adapters], grams[module],
                                  alpha, lam, task_weights=task_weights)
        assert _relative_error(lora_B @ lora_A, expected) <= 1e-5
        assert result.notes == {}
    # The saved factors are the in-memory ones.
    saved = get_method("regmean").save_fn(merged.merge_module(MODULE), 8)
    assert saved[2] == 0.0 and torch.equal(saved[0] @ saved[1], merged.delta(MODULE))


def test_singular_gram_sum_grows_the_ridge_and_records_it(adapters: dict[str, Path]) -> None:
    """A feature no task ever sees makes the Gram sum singular: the ridge grows from EPS_START by
    10x until Cholesky succeeds, the result is the closed form with that ridge, and the module's
    eps lands in the merge's method summary."""
    generator = torch.Generator().manual_seed(1)
    factors = [(torch.randn(6, r, generator=generator), torch.randn(r, 5, generator=generator), 0.5)
               for r in (2, 3)]
    grams = []
    for _ in factors:
        x = torch.randn(30, 5, generator=generator, dtype=torch.float64)
        x[:, 2] = 0.0  # an input feature that is always zero
        grams.append(x.T @ x)
    merged = regmean(factors, grams, alpha=1.0, lam=1.0)
    assert merged.eps >= EPS_START
    assert merged.eps / 10 < EPS_START or torch.linalg.cholesky_ex(
        sum(grams) + merged.eps / 10 * torch.diagonal(sum(grams)).mean() * torch.eye(5, dtype=torch.float64)
    ).info > 0
    expected = _dense_regmean([s * b @ a for b, a, s in factors], grams, 1.0, 1.0, ridge=merged.eps)
    assert _relative_error(merged.lora_B @ merged.lora_A, expected) <= 1e-5
    # Through a MergeOutput: the eps is recorded per module.
    output = prepare_merge({"adapters": [str(p) for p in adapters.values()], "method": "task_vector"})
    singular = {}
    for module in output.modules:
        features = output.adapters[0].modules[module].shape[1]
        x = torch.randn(50, features, generator=generator, dtype=torch.float64)
        if module == MODULE:
            x[:, 0] = 0.0
        singular[module] = [x.T @ x for _ in output.adapters]
    merge = MergeOutput(method=get_method("regmean"), adapters=output.adapters, modules=output.modules,
                        left_out={}, params={"alpha": 1.0, "lambda": 1.0, "task_weights": 1.0,
                                             "samples_per_task": 1,
                                             "split": "train", "seed": 0},
                        policy=output.policy, grams=FakeGrams(singular))
    for module in output.modules:
        merge.merge_module(module)
    notes = merge.method_summary()["module_notes"]
    assert set(notes) == {MODULE} and notes[MODULE]["eps"] >= EPS_START


# --- a causal-LM workspace with train splits --------------------------------------------------


def _tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[EOS]", *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]",
                                   eos_token="[EOS]")


@pytest.fixture(scope="module")
def lm_session(llama_base: Path, make_adapter, tmp_path_factory: pytest.TempPathFactory) -> EvalSession:  # type: ignore[no-untyped-def]
    """Two causal-LM tasks (label scoring with a prompt template, generation) on the tiny Llama,
    each with a train and a test split."""
    root = tmp_path_factory.mktemp("regmean_lm")
    base = root / "base"
    LlamaForCausalLM.from_pretrained(llama_base).save_pretrained(base)
    _tokenizer().save_pretrained(base)
    rng = random.Random(0)
    tasks = {}
    for seed, (task, evaluator, metric) in enumerate(
        [("pick", "causal_lm_label_scoring", "accuracy"), ("echo", "generation", "wer")], start=1
    ):
        for split, count in (("train", 12), ("test", 6)):
            rows = []
            for _ in range(count):
                text = " ".join(rng.choice(WORDS[2:]) for _ in range(rng.randint(2, 7)))
                rows.append({"text": text, "label": rng.choice(["yes", "no"]),
                             "reference": " ".join(text.split()[:2])})
            (root / f"{task}_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        tasks[task] = {"adapter": str(make_adapter(f"regmean_{task}", base=base, seed=seed, r=2 + seed)),
                       "data": {"train": f"{task}_train.jsonl", "test": f"{task}_test.jsonl"},
                       "evaluator": evaluator, "primary_metric": metric, "batch_size": 4,
                       "max_length": 12, "max_new_tokens": 2,
                       **({"labels": ["yes", "no"], "prompt_template": "{text} sky sea"}
                          if task == "pick" else {})}
    spec = {"name": "regmean-lm", "base_model": {"path": "base", "model_class": "causal_lm", "device": "cpu"},
            "tasks": tasks}
    (root / "workspace.yaml").write_text(yaml.safe_dump(spec))
    return EvalSession.from_workspace(load_workspace(root / "workspace.yaml"), root / "artifacts")


PARAMS = {"alpha": 0.9, "lambda": 1.0, "samples_per_task": 8, "split": "train", "seed": 3}


def _adapters(session: EvalSession) -> list:  # type: ignore[type-arg]
    return [session.adapter(task) for task in ("pick", "echo")]


def test_lm_grams_count_prompt_positions_only(lm_session: EvalSession) -> None:
    """One module's collected Gram equals X^T X of its inputs captured one unpadded prompt at a
    time (the prompt as the evaluator renders it, no label tokens), under the task's own adapter;
    padding never counts."""
    session, holder = lm_session, lm_session.holder
    started = time.perf_counter()
    source = session.grams(_adapters(session), [MODULE], PARAMS)
    collection_s = time.perf_counter() - started
    print(f"gram collection (2 tasks x 8 rows, tiny Llama): {collection_s:.3f} s")
    config = session.workspace.task("pick")
    texts = session.split_data("pick", "train").texts
    chosen = [texts[i] for i in select_rows(len(texts), 8, 3)]
    assert all(text.endswith(" sky sea") for text in chosen)  # the template's prompt
    captured: list[torch.Tensor] = []
    expected = torch.zeros(32, 32, dtype=torch.float64)
    tokens = 0
    with holder.applied(session.task_output("pick")), holder.inputs_seen(
            {MODULE: lambda x: captured.append(x.detach().clone())}), torch.inference_mode():
        for text in chosen:
            ids = prompt_token_ids(holder.tokenizer, config, text)
            tokens += len(ids)
            holder.model(input_ids=torch.tensor([ids]))
            rows = captured.pop().reshape(-1, 32).double()
            assert rows.shape[0] == len(ids)
            expected += rows.T @ rows
    collected = source.grams(MODULE)[0]
    assert collected.dtype == torch.float64 and collected.shape == (32, 32)
    # Batched (padded) against unbatched float32 activations: equal up to float32 rounding; a
    # counted pad or label token would be off by far more.
    assert _relative_error(collected, expected) <= 1e-5
    assert source.describe()["tasks"]["pick"]["tokens"] == tokens
    assert holder.is_pristine


def test_second_run_reads_the_cache_and_other_settings_do_not(lm_session: EvalSession) -> None:
    session, holder = lm_session, lm_session.holder
    first = session.grams(_adapters(session), [MODULE], PARAMS)
    forward_passes = []
    with holder.inputs_seen({MODULE: lambda x: forward_passes.append(1)}):
        again = session.grams(_adapters(session), [MODULE], PARAMS)
    assert forward_passes == []  # read, not recomputed
    assert all(entry["cached"] for entry in again.describe()["tasks"].values())
    for a, b in zip(first.grams(MODULE), again.grams(MODULE)):
        assert torch.equal(a, b)
    with holder.inputs_seen({MODULE: lambda x: forward_passes.append(1)}):
        other = session.grams(_adapters(session), [MODULE], {**PARAMS, "seed": 4})
    assert forward_passes and not any(e["cached"] for e in other.describe()["tasks"].values())
    keys = {e["key"] for e in first.describe()["tasks"].values()}
    assert not keys & {e["key"] for e in other.describe()["tasks"].values()}


def test_run_merge_saves_an_adapter_with_the_in_memory_logits(lm_session: EvalSession) -> None:
    """Through the runner on the LM workspace: progress reported, metadata with the Grams, and
    the saved PEFT adapter gives the in-memory merge's logits."""
    from peft import PeftModel

    session = lm_session
    before = session.holder.weights_fingerprint()
    seen: list[str] = []
    result = run_merge({"adapters": ["pick", "echo"], "method": "regmean",
                        "method_params": {k: v for k, v in PARAMS.items() if k != "lambda"}},
                       task_registry=session.workspace.task_registry(), artifacts_dir=session.root,
                       session=session, save=True,
                       progress=lambda done, total, message, extra: seen.append(message))
    assert any(m.startswith("regmean: solved") for m in seen)
    metadata = json.loads((result.run_dir / RUN_METADATA_FILE).read_text())
    summary = metadata["method_summary"]
    assert summary["solved_modules"] == len(result.output.modules)
    assert set(summary["grams"]["tasks"]) == {"pick", "echo"}
    assert metadata["saved"]["exact"] and metadata["saved"]["rank"] == 3 + 4  # sum of ranks
    ids = torch.tensor([[3, 5, 7, 9, 11, 4]])
    with session.holder.applied(result.output), torch.inference_mode():
        in_memory = session.holder.model(input_ids=ids).logits
    base = LlamaForCausalLM.from_pretrained(session.workspace.base_model_path())
    loaded = PeftModel.from_pretrained(base, result.run_dir).eval()
    with torch.inference_mode():
        saved = loaded(input_ids=ids).logits
    torch.testing.assert_close(saved, in_memory, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in session.holder.weights_fingerprint().items())


def test_regmean_plus_takes_each_layer_through_the_merged_earlier_layers(lm_session: EvalSession) -> None:
    """RegMean++ on the two-layer Llama: layer 0 is solved exactly as plain RegMean solves it (its
    inputs do not depend on the merge); a layer-1 module is solved with Grams of its inputs with
    layer 0 merged and the task's own adapter on layer 1, captured one unpadded prompt at a time
    (1e-5); the run metadata says so; the model is left as it was."""
    session, holder = lm_session, lm_session.holder
    before = holder.weights_fingerprint()
    config = {"adapters": ["pick", "echo"], "method": "regmean", "method_params": PARAMS}
    plain = prepare_merge(config, task_registry=session.workspace.task_registry(), session=session)
    seen: list[str] = []
    plus = prepare_merge({**config, "method_params": {**PARAMS, "plus": True}},
                         task_registry=session.workspace.task_registry(), session=session,
                         progress=lambda done, total, message, extra: seen.append(message))
    assert any(m.startswith("regmean++ grams, layer 2/2, echo") for m in seen)
    described = plus.method_summary()["grams"]
    assert described["plus"] and described["layers"] == 2 and described["tasks"]["pick"]["rows"] == 8
    first = [m for m in plus.modules if ".layers.0." in m]
    assert first and all(
        _relative_error(plus.delta(m), plain.delta(m)) <= 1e-12 for m in first)
    later = [m for m in plus.modules if ".layers.1." in m]
    expected_grams = []
    for task in ("pick", "echo"):
        own = session.task_output(task)
        applied = {m: plus.delta(m) for m in first} | {m: own.delta(m) for m in later}
        texts = session.split_data(task, "train").texts
        captured: list[torch.Tensor] = []
        gram = torch.zeros(32, 32, dtype=torch.float64)
        with holder.deltas_applied(list(applied), applied.__getitem__, False), holder.inputs_seen(
                {MODULE: lambda x: captured.append(x.detach().clone())}), torch.inference_mode():
            for index in select_rows(len(texts), 8, 3):
                ids = prompt_token_ids(holder.tokenizer, session.workspace.task(task), texts[index])
                holder.model(input_ids=torch.tensor([ids]))
                rows = captured.pop().reshape(-1, 32).double()
                gram += rows.T @ rows
        expected_grams.append(gram)
    sources = [plus.adapters[i].modules[MODULE] for i in range(2)]
    expected = regmean([(s.lora_B, s.lora_A, s.scaling) for s in sources], expected_grams, alpha=0.9, lam=1.0)
    assert _relative_error(plus.delta(MODULE), expected.lora_B.double() @ expected.lora_A.double()) <= 1e-5
    assert _relative_error(plus.delta(MODULE), plain.delta(MODULE)) > 1e-3  # the merged layer 0 matters
    assert all(torch.equal(before[k], v) for k, v in holder.weights_fingerprint().items())


def test_regmean_is_refused_without_the_resident_model_or_a_workspace_task(
        lm_session: EvalSession, adapters: dict[str, Path]) -> None:
    registry = lm_session.workspace.task_registry()
    with pytest.raises(ParamError, match="needs the resident model and the workspace's task data"):
        run_merge({"adapters": ["pick", "echo"], "method": "regmean"}, task_registry=registry,
                  artifacts_dir=lm_session.root)
    with pytest.raises(ParamError, match="needs the resident model"):
        plan_merge({"adapters": ["pick", "echo"], "method": "regmean"}, registry)
    stranger = str(adapters["alpha"])
    with pytest.raises(ParamError, match="adapter\\(s\\) 'alpha' are not workspace tasks"):
        plan_merge({"adapters": ["pick", stranger], "method": "regmean"}, registry,
                   task_evaluators=lm_session.task_evaluators())
    with pytest.raises(ParamError, match="'alpha' must lie|out of range"):
        plan_merge({"adapters": ["pick", "echo"], "method": "regmean", "method_params": {"alpha": 1.5}},
                   registry, task_evaluators=lm_session.task_evaluators())


def test_regmean_through_the_service(tiny_workspace: Path, tmp_path: Path) -> None:
    """POST /merges with regmean and with RegMean++ on the classification workspace (each task's
    head on during collection), with evaluation: succeeded, and the run metadata shows the Grams;
    then task weights searched by optimizer bayes; bad params are refused with a 422."""
    from app.settings import Settings
    from tests.service_helpers import thread_server, wait_job

    with thread_server(Settings(workspace=tiny_workspace, artifacts_dir=tmp_path / "artifacts")) as (client, _):
        for plus in (False, True):
            answer = client.post("/merges", json={
                "adapters": ["topic", "mood"], "method": "regmean", "save_merged": True,
                "method_params": {"samples_per_task": 16, "alpha": 0.8, "plus": plus},
                "eval_tasks": ["topic", "mood"]})
            assert answer.status_code == 202, answer.text
            done = wait_job(client, answer.json()["id"])
            assert done["status"] == "succeeded", done["error"]
            assert set(done["result"]["evaluation"]["metrics"]) == {"topic", "mood"}
            metadata = json.loads((Path(done["result"]["run_dir"]) / RUN_METADATA_FILE).read_text())
            grams = metadata["method_summary"]["grams"]
            assert grams["samples_per_task"] == 16 and grams["split"] == "train"
            assert grams.get("plus", False) is plus and metadata["params"]["plus"] is plus
            assert all(t["rows"] == 16 and t["tokens"] > 16 for t in grams["tasks"].values())
            assert metadata["saved"]["exact"] and metadata["params"]["alpha"] == 0.8
        # Task weights searched by optimizer bayes (on the train split), then the merge at the best.
        answer = client.post("/merges", json={
            "adapters": ["topic", "mood"], "method": "regmean", "eval_tasks": ["topic", "mood"],
            "method_params": {"samples_per_task": 16, "lambda": [1.0, 1.2]},
            "optimizer": {"name": "bayes", "params": {
                "budget": 3, "init_points": 2, "search_subset": {"max_samples": 16},
                "space": {"task_weights": {"min": 0.5, "max": 2.0, "per_adapter": True}}}}})
        assert answer.status_code == 202, answer.text
        done = wait_job(client, answer.json()["id"])
        assert done["status"] == "succeeded", done["error"]
        metadata = json.loads((Path(done["result"]["run_dir"]) / RUN_METADATA_FILE).read_text())
        weights = metadata["params"]["task_weights"]
        assert len(weights) == 2 and all(0.5 <= w <= 2.0 for w in weights)
        assert metadata["params"]["lambda"] == [1.0, 1.2]
        for params, name in (({"alpha": 2}, "'alpha'"), ({"task_weights": [1.0, 2.0, 3.0]}, "'task_weights'"),
                             ({"task_weights": [1.0, -1.0]}, "'task_weights'"),
                             ({"task_weights": [0.0, 0.0]}, "task_weights: at least one task")):
            refused = client.post("/merges", json={"adapters": ["topic", "mood"], "method": "regmean",
                                                   "method_params": params})
            assert refused.status_code == 422 and name in refused.text, refused.text
