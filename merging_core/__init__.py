"""merging_core: merge PEFT LoRA adapters, evaluate and search merge coefficients.

The library never imports the service (`app`). Public API:

    from merging_core import run_merge, load_merge_config
    result = run_merge(load_merge_config("configs/merge/merge_ties.yaml"), save=True)
"""

from merging_core.adapters import load_adapter, load_task_registry
from merging_core.config import MergeConfig, MergeSpec, load_merge_config, parse_merge_config
from merging_core.engine import MergeMethod, get_method, list_methods, register
from merging_core.engine.merge import MergeOutput
from merging_core.engine.runner import MergeResult, prepare_merge, run_merge
from merging_core.errors import MergeError

# `optimizer: bayes` runs a sweep, so it registers itself from merging_core.search; importing the
# package makes it available to every run_merge.
import merging_core.search  # noqa: E402,F401  isort: skip

__all__ = [
    "MergeConfig",
    "MergeError",
    "MergeMethod",
    "MergeOutput",
    "MergeResult",
    "MergeSpec",
    "get_method",
    "list_methods",
    "load_adapter",
    "load_merge_config",
    "load_task_registry",
    "parse_merge_config",
    "prepare_merge",
    "register",
    "run_merge",
]
