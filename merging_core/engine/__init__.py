"""Registry, built-in methods and the runner."""

from merging_core.engine import builtin_methods  # noqa: F401  (registers the built-ins)
from merging_core.engine.registry import MergeMethod, get_method, list_methods, register

__all__ = ["MergeMethod", "get_method", "list_methods", "register"]
