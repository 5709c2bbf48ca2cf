"""Figures of accuracy as fine-tuning proceeds (matrices/within_<kind>.csv): one panel per evaluated
dataset, accuracy against the global step, one line per run, task boundaries as dotted lines and
the pretrained value dashed."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import matplotlib

from ..evaluation.matrix import PRETRAINED
from ..evaluation.within import Curve, curve_files
from .figures import KIND_LABELS, PLAIN_TEXT, accuracy_limits, panel_grid, save
from .plots import run_label


def task_ends(curve: Curve) -> list[tuple[str, int]]:
    """(task, global step at its end) for each trained task of the curve."""
    ends: dict[str, int] = {}
    for task, _, global_step in curve.points:
        if task != PRETRAINED:
            ends[task] = global_step
    return list(ends.items())


@matplotlib.rc_context(PLAIN_TEXT)
def build_within(series: Sequence[tuple[str, Curve]], kind: str):
    """series: (label, curve) per run, the first one's datasets and task boundaries drawn."""
    drawn = [(label, c) for label, c in series if c.points]
    if not drawn:
        return None
    columns = drawn[0][1].columns
    trained = {task for task, _ in task_ends(drawn[0][1])}
    fig, axes = panel_grid(len(columns), 3.6)
    shown: list[float] = []
    for ax, column in zip(axes, columns):
        for label, curve in drawn:
            if column not in curve.columns:
                continue
            i = curve.columns.index(column)
            steps = [p[2] for p in curve.points]
            values = [row[i] for row in curve.values]
            line, = ax.plot(steps, values, marker="o", markersize=2, linewidth=1.2, label=label)
            shown += values
            if curve.points[0][0] == PRETRAINED and not math.isnan(values[0]):
                ax.axhline(values[0], color=line.get_color(), linestyle="--", linewidth=0.8, alpha=0.7)
        for task, end in task_ends(drawn[0][1])[:-1]:
            ax.axvline(end, color="0.6", linestyle=":", linewidth=0.8)
        ax.set_title(f"{column} ({'trained' if column in trained else 'never trained'})", fontsize=9)
        if column not in trained:
            ax.set_facecolor("0.95")
        ax.set_xlabel("global step", fontsize=8)
        ax.tick_params(labelsize=7)
    lo, hi = accuracy_limits(shown, floor=10.0)
    for ax in axes:
        ax.set_ylim(lo, hi)
    runs = ", ".join(label for label, _ in drawn) if len(drawn) <= 3 else f"{len(drawn)} runs"
    fig.suptitle(f"{runs}: {KIND_LABELS.get(kind, kind)} accuracy (%) during fine-tuning (dotted: task ends; "
                 f"dashed: pretrained; one y-axis, {lo:.0f}-{hi:.0f}%)", fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    if len(drawn) > 1:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 if len(drawn) > 1 else 0, 1, 0.95))
    return fig


def within_figure(series: Sequence[tuple[str, Curve]], kind: str, path: Path, fmt: str = "png") -> Optional[Path]:
    fig = build_within(series, kind)
    return None if fig is None else save(fig, path, fmt)


def read_curves(run_dir: Path) -> dict[str, Curve]:
    """Every within-task curve of a run, read (one line for a bad one) before anything is drawn."""
    return {kind: Curve.load(path) for kind, path in curve_files(run_dir / "matrices").items()}


def plot_within(run_dir: Path, fmt: str = "png", curves: Optional[dict[str, Curve]] = None) -> list[Path]:
    """within_<kind>.<fmt> (and PNG) for each curve a run wrote (`curves`: read_curves's, if read)."""
    written = []
    for kind, curve in (read_curves(run_dir) if curves is None else curves).items():
        for f in ["png"] + ([fmt] if fmt != "png" else []):
            out = within_figure([(run_label(run_dir), curve)], kind, run_dir / f"within_{kind}", f)
            written += [out] if out else []
    return written
