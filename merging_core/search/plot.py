"""Sweep plots (matplotlib's object API: no pyplot state, so threads may render at once)."""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from merging_core.runtime.io import atomic_write


def _numeric_dims(trials: Sequence[Any]) -> list[str]:
    names = list(trials[0].point)
    return [n for n in names if all(isinstance(t.point[n], (int, float)) for t in trials)]


# The objective-by-trial plot lists the best point's coordinates up to this many.
MAX_LISTED_COORDINATES = 16


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):  # per-adapter values
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    return str(value)


def _best_point_text(best: Any, label: Callable[[str], str]) -> str:
    lines = [f"best (trial {best.index}):"]
    items = list(best.point.items())
    for name, value in items[:MAX_LISTED_COORDINATES]:
        lines.append(f"{label(name)} = {_shown(value)}")
    if len(items) > MAX_LISTED_COORDINATES:
        lines.append(f"... {len(items) - MAX_LISTED_COORDINATES} more")
    return "\n".join(lines)


def plot_sweep(trials: Sequence[Any], tasks: Sequence[str], path: Path,
               labels: Mapping[str, str] | None = None) -> None:
    """Write `sweep_plot_png` of the trials to `path` (atomically)."""
    png = sweep_plot_png(trials, tasks, labels)
    atomic_write(path, lambda temp: temp.write_bytes(png))


def sweep_plot_png(trials: Sequence[Any], tasks: Sequence[str],
                   labels: Mapping[str, str] | None = None, title: str | None = None) -> bytes:
    """The sweep plot as PNG bytes. One dim: each task's delta and the objective along it; two
    dims: the objective (and each task's delta) over the plane; more: the objective by trial,
    with the best point listed. `labels` names the axes (e.g. `lambda@group1 (layers 8-15)`, or
    `lambda@group1 (encoder 2-3, decoder 0-1)` over an encoder-decoder model's stacks); a
    coordinate's name otherwise."""
    if not trials:
        raise ValueError("no trials")

    def label(name: str) -> str:
        return (labels or {}).get(name, name)

    dims = _numeric_dims(trials)
    n_dims = len(trials[0].point)
    if n_dims == 1 and dims:
        figure = Figure(figsize=(7, 4.5))
        axis = figure.subplots()
        ordered = sorted(trials, key=lambda t: t.point[dims[0]])
        xs = [t.point[dims[0]] for t in ordered]
        for task in tasks:
            axis.plot(xs, [t.interference_delta[task] for t in ordered], marker="o", label=f"{task} delta")
        axis.plot(xs, [t.objective for t in ordered], marker="s", color="black", linewidth=2,
                  label="min over tasks (objective)")
        axis.axhline(0.0, color="grey", linewidth=0.8)
        axis.set_xlabel(label(dims[0]))
        axis.set_ylabel("interference delta (higher is better)")
        axis.legend()
    elif n_dims == 2 and len(dims) == 2:
        panels = ["objective", *tasks]
        figure = Figure(figsize=(4.2 * len(panels), 4))
        axes = figure.subplots(1, len(panels), squeeze=False)
        for axis, panel in zip(axes[0], panels):
            values = [t.objective if panel == "objective" else t.interference_delta[panel] for t in trials]
            scatter = axis.scatter([t.point[dims[0]] for t in trials], [t.point[dims[1]] for t in trials],
                                   c=values, cmap="viridis", s=60)
            figure.colorbar(scatter, ax=axis)
            axis.set_xlabel(label(dims[0]))
            axis.set_ylabel(label(dims[1]))
            axis.set_title("min over tasks" if panel == "objective" else f"{panel} delta")
    else:
        figure = Figure(figsize=(10, 4.5))  # room for the best point on the right
        axis = figure.subplots()
        ordered = sorted(trials, key=lambda t: t.index)
        objectives = [t.objective for t in ordered]
        running = [max(objectives[: i + 1]) for i in range(len(objectives))]
        axis.plot([t.index for t in ordered], objectives, marker="o", linestyle="", label="trial")
        axis.plot([t.index for t in ordered], running, color="black", label="best so far")
        axis.set_xlabel("trial")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_ylabel("min interference delta")
        axis.legend()
        best = max(ordered, key=lambda t: t.objective)
        axis.text(1.02, 1.0, _best_point_text(best, label), transform=axis.transAxes,
                  va="top", ha="left", fontsize=8, family="monospace")
    figure.suptitle(title or "sweep: max-min interference")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()
