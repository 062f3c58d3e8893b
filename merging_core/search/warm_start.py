"""Warm start: reuse trials of earlier sweeps that searched the same thing.

A summary's trials are used only when its context (method, adapters, merge_mode, split,
eval_tasks, constraint_nonnegative, eval subset) equals this sweep's and the point lies in this
search space; every other point is reported with the reason it was skipped. Layer-group
coordinates (`lambda@group2`, `lambda@group2[1]`) are names like any other; a summary that
searched layer groups is used only when its groups span the same layers as this sweep's.

A trial is used only at a fidelity this sweep scores at: the eval subset's size, or one of a
multi-fidelity sweep's rungs (the context's eval subset fixes what each size's rows are). A
multi-fidelity sweep's lower-fidelity trials never warm-start a plain sweep. A trial that
names no fidelity was scored on its summary's eval subset.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from merging_core.config.schema import SearchConfig
from merging_core.search.space import Dimension, LayerGroups


def _summary_files(source: str) -> list[Path]:
    path = Path(source)
    if path.is_dir():
        return sorted(path.glob("sweep_*.json"))
    if path.is_file():
        return [path]
    return sorted(Path(p) for p in glob.glob(source))


def load_warm_start(
    search: SearchConfig, context: dict[str, Any], dimensions: Sequence[Dimension], own_summary: Path,
    *, layer_groups: LayerGroups = (), fidelities: Sequence[int | None] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Points from earlier sweeps that match this one; the rest are reported with a reason.
    A summary file named by several sources is read once; this sweep's own summary is skipped
    (its trials are resumed instead). `fidelities`: those this sweep scores at (None: any)."""
    used: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    names = sorted(d.name for d in dimensions) if dimensions else sorted(search.grid)
    cap = search.warm_start_max_points
    groups = [list(group) for group in layer_groups]
    read: set[Path] = {Path(own_summary).resolve()}
    for source in search.warm_start_sweeps:
        files = _summary_files(source)
        if not files:
            skipped.append({"source": source, "reason": "no sweep_*.json found"})
        for path in files:
            if path.resolve() in read:
                continue
            read.add(path.resolve())
            try:
                summary = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                skipped.append({"source": str(path), "reason": f"unreadable: {exc}"})
                continue
            theirs = summary.get("context", {})
            mismatched = [key for key in context if theirs.get(key) != context[key]]
            if mismatched:
                skipped.append({"source": str(path), "reason": f"{', '.join(mismatched)} differ"})
                continue
            their_groups = summary.get("layer_groups")
            if groups and their_groups and their_groups != groups:  # same names, other layers
                skipped.append({"source": str(path),
                                "reason": f"layer groups differ: {their_groups} there, {groups} here"})
                continue
            for trial in summary.get("trials", []):
                point = trial.get("point", {})
                if fidelities is not None and "fidelity" in trial and trial["fidelity"] not in fidelities:
                    skipped.append({"source": f"{path}#trial{trial.get('index')}",
                                    "reason": f"scored at fidelity {trial['fidelity']}; this sweep "
                                              f"scores at {', '.join(map(str, fidelities))}"})
                elif sorted(point) != names:
                    skipped.append({"source": f"{path}#trial{trial.get('index')}",
                                    "reason": f"searched {sorted(point)}, not {names}"})
                elif not all(_is_number(point[d.name]) for d in dimensions):
                    skipped.append({"source": f"{path}#trial{trial.get('index')}",
                                    "reason": "a value is not a single number (e.g. per-adapter lists), "
                                              "so it is no point of this search space"})
                elif not all(d.contains(point[d.name]) for d in dimensions):
                    skipped.append({"source": f"{path}#trial{trial.get('index')}",
                                    "reason": "outside the search space"})
                elif cap is not None and len(used) >= cap:
                    skipped.append({"source": f"{path}#trial{trial.get('index')}",
                                    "reason": f"warm_start_max_points={cap} reached"})
                else:
                    used.append(trial)
    return used, skipped


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
