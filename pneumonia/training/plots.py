"""Plots of a sweep: where in the space the objective is high, and how trials learned.

Matplotlib's object API (``Figure``) with the Agg canvas: no global state, no display needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PREFERRED_AXES = ("train.learning_rate", "train.normal_class_weight")


def _figure(width: float = 6.4, height: float = 4.8):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="tight")


def _numeric(trials: list[dict[str, Any]], key: str) -> bool:
    values = [t.get(f"param:{key}") for t in trials]
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values if v is not None)


def plot_objective_map(trials: list[dict[str, Any]], config, path: Path) -> Path:
    """Objective over learning rate x NORMAL class weight (or the first two numeric parameters)."""
    numeric = [key for key in config.tune.space if _numeric(trials, key)]
    axes = [key for key in PREFERRED_AXES if key in numeric] or numeric
    axes = (axes + [key for key in numeric if key not in axes])[:2]
    figure = _figure()
    ax = figure.add_subplot()
    done = [t for t in trials if t["objective"] is not None]
    colours = [t["objective"] for t in done]
    if len(axes) == 2:
        x = [t[f"param:{axes[0]}"] for t in done]
        y = [t[f"param:{axes[1]}"] for t in done]
        points = ax.scatter(x, y, c=colours, cmap="viridis", s=70, edgecolors="black")
        figure.colorbar(points, ax=ax, label="precision at target recall")
        ax.set_ylabel(axes[1])
    elif axes:
        x = [t[f"param:{axes[0]}"] for t in done]
        ax.scatter(x, colours, s=60)
        ax.set_ylabel("precision at target recall")
    else:
        ax.bar(range(len(done)), colours)
        ax.set_ylabel("precision at target recall")
    if axes:
        ax.set_xlabel(axes[0])
        spec = config.tune.space[axes[0]]
        if spec.type == "loguniform":
            ax.set_xscale("log")
    ax.set_title(f"Objective by trial (target recall {config.objective.target_recall})")
    figure.savefig(path)
    return path


def plot_learning_curves(trials: list[dict[str, Any]], config, path: Path) -> Path:
    """Validation objective per epoch for every trial; trials stopped early end early."""
    figure = _figure(7.2, 4.8)
    ax = figure.add_subplot()
    for trial in trials:
        points = [(epoch, value) for epoch, value in trial["curve"] if epoch is not None and value is not None]
        if points:
            ax.plot(*zip(*points), marker="o", markersize=3, label=trial["trial_id"])
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation precision at target recall")
    ax.set_title("Learning curves")
    if len(trials) <= 12:
        ax.legend(fontsize=7)
    figure.savefig(path)
    return path
