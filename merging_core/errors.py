"""The library's one exception tree.

Every error caused by bad input is a `MergeError`, itself a `ValueError`, so callers (the CLI,
the HTTP service) can map the whole tree to a clear message in one place.
"""

from __future__ import annotations


class MergeError(ValueError):
    """Root of every error raised by merging_core for bad input or bad state."""


class ConfigError(MergeError):
    """A merge config or spec is invalid (unknown key, bad value, bad combination)."""


class UnknownMethodError(ConfigError):
    """The method (or transform, optimizer, policy) name is not registered."""


class ParamError(ConfigError):
    """A method parameter is missing, unknown or out of range."""


class AdapterError(MergeError):
    """An adapter cannot be resolved or loaded."""


class AdapterNotFoundError(AdapterError):
    """The adapter is neither a known task name nor an existing directory."""


class UnsupportedAdapterError(AdapterError):
    """The adapter exists but uses a format or PEFT feature we refuse (pickle, DoRA, ...)."""


class IncompatibleAdaptersError(AdapterError):
    """The adapters cannot be merged together (different base models, shapes, module sets)."""


class NonFiniteWeightsError(AdapterError):
    """An adapter tensor holds NaN or Inf."""


class ArtifactError(MergeError):
    """The artifact directory cannot be written as asked."""


class EvaluationError(MergeError):
    """A task cannot be evaluated as configured (missing head, wrong evaluator for the data)."""


class Cancelled(MergeError):
    """The job was cancelled through its cancel token; model weights were restored."""
