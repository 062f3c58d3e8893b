"""Fixtures: tiny real transformers models and real PEFT LoRA adapters built from them."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The services the tests start are the only load on the machine: let their worker process use
# every core (the default keeps one for the API, for latency under load; see bench/api_bench.py).
os.environ.setdefault("LORA_MERGE_WORKER_THREADS", str(len(os.sched_getaffinity(0))))

from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def _tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="session")
def llama_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base") / "tiny-llama"
    _tiny_llama().save_pretrained(path)
    return path


AdapterFactory = Callable[..., Path]


@pytest.fixture(scope="session")
def make_adapter(llama_base: Path, tmp_path_factory: pytest.TempPathFactory) -> AdapterFactory:
    root = tmp_path_factory.mktemp("adapters")

    def build(
        name: str,
        *,
        r: int = 4,
        alpha: float = 8,
        seed: int = 0,
        targets: list[str] | None = None,
        base: Path | None = None,
        **extra: object,
    ) -> Path:
        path = root / name
        if path.exists():
            return path
        torch.manual_seed(seed)
        model = LlamaForCausalLM.from_pretrained(base or llama_base)
        config = LoraConfig(
            r=r,
            lora_alpha=alpha,
            target_modules=targets or TARGETS,
            init_lora_weights=False,
            **extra,
        )
        peft_model = get_peft_model(model, config)
        with torch.no_grad():  # non-zero B with a realistic scale
            for param_name, param in peft_model.named_parameters():
                if "lora_" in param_name:
                    param.mul_(0.5)
        peft_model.save_pretrained(path)
        return path

    return build


@pytest.fixture(scope="session")
def adapters(make_adapter: AdapterFactory) -> dict[str, Path]:
    """Three adapters on the same tiny base with different ranks and scalings."""
    return {
        "alpha": make_adapter("alpha", r=4, alpha=8, seed=1),
        "beta": make_adapter("beta", r=8, alpha=16, seed=2, use_rslora=True),
        "gamma": make_adapter(
            "gamma", r=4, alpha=4, seed=3, rank_pattern={"layers.1.self_attn.q_proj": 2},
            alpha_pattern={"layers.1.self_attn.q_proj": 6},
        ),
    }


@pytest.fixture(scope="session")
def equal_rank_adapters(make_adapter: AdapterFactory) -> dict[str, Path]:
    return {
        "left": make_adapter("left", r=4, alpha=8, seed=11),
        "right": make_adapter("right", r=4, alpha=8, seed=12),
    }


@pytest.fixture(scope="session")
def bert_adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Sequence-classification adapters whose heads (modules_to_save) differ in size."""
    root = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        vocab_size=64, max_position_embeddings=64,
    )
    base_path = root / "tiny-bert"
    BertForSequenceClassification(config).save_pretrained(base_path)
    paths = {}
    for seed, (name, labels) in enumerate({"intent": 3, "sentiment": 2}.items()):
        torch.manual_seed(seed)
        model = BertForSequenceClassification.from_pretrained(
            base_path, num_labels=labels, ignore_mismatched_sizes=True
        )
        lora = LoraConfig(
            r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"],
            init_lora_weights=False, task_type="SEQ_CLS",
        )
        get_peft_model(model, lora).save_pretrained(root / name)
        paths[name] = root / name
    return paths


# --- a tiny sequence-classification workspace ------------------------------------------------

from scripts.make_tiny_workspace import build_tiny_workspace  # noqa: E402

@pytest.fixture(scope="session")
def tiny_workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_workspace(tmp_path_factory.mktemp("tiny_workspace"))


@pytest.fixture(scope="session")
def tiny_session_factory(tiny_workspace: Path):  # type: ignore[no-untyped-def]
    """Sessions over one shared holder (the base model loads once per test session)."""
    from merging_core.evaluation.evaluate import EvalSession
    from merging_core.evaluation.workspace import load_workspace

    workspace = load_workspace(tiny_workspace)
    holder = EvalSession.from_workspace(workspace, tiny_workspace.parent / "unused").holder

    def make(artifacts: Path) -> EvalSession:
        return EvalSession(workspace, holder, artifacts)

    return make


@pytest.fixture(scope="session")
def ray_cluster():  # type: ignore[no-untyped-def]
    """One local Ray cluster for the whole test session (2 CPUs, no dashboard, a 200 MB object
    store), started only if a test asks for it; teardown checks no Ray process is left."""
    from tests.ray_helpers import ray_cluster as start

    with start() as cluster:
        yield cluster


@pytest.fixture(params=["embedded", "ray"])
def executor_settings(request: pytest.FixtureRequest) -> dict[str, object]:
    """Settings that pick the executor: the embedded worker process, or two model actors on
    the session's Ray cluster (one torch thread each)."""
    if request.param == "embedded":
        return {"executor": "embedded"}
    cluster = request.getfixturevalue("ray_cluster")
    return {"executor": "ray", "ray_address": cluster.address, "ray_workers": 2, "worker_threads": 1}
