"""Cooperative cancellation and progress reporting, shared by evaluation and sweeps."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from merging_core.errors import Cancelled


@dataclass
class CancelToken:
    """Set from any thread; checked by the worker between batches, modules and trials."""

    _event: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled("cancelled")


def check(cancel: CancelToken | None) -> None:
    if cancel is not None:
        cancel.raise_if_cancelled()


# progress(done, total, message, extra) -- extra carries e.g. the current best of a sweep.
Progress = Callable[[int, int, str, dict[str, Any]], None]


def report(progress: Progress | None, done: int, total: int, message: str, **extra: Any) -> None:
    if progress is not None:
        progress(done, total, message, extra)
