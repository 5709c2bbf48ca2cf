"""A run's figures: a heatmap per matrix (and its change vs pretrained), accuracy curves."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from ..errors import CfbenchError
from ..evaluation.matrix import Matrix
from ..evaluation.within import matrix_files
from ..files import read_yaml_mapping
from .figures import PLAIN_TEXT, RunGroup, curves_figure, save

TITLES = {"lp": "linear-probe accuracy (%)", "head": "task-head accuracy (%)", "zs": "zero-shot accuracy (%)",
          "lp_ece": "linear-probe calibration error (%, lower is better)",
          "head_ece": "task-head calibration error (%, lower is better)",
          "zs_ece": "zero-shot calibration error (%, lower is better)"}
# one colour scale per kind, the same in every figure: accuracy 0-100; calibration error 0-ECE_MAX
# (reversed colours, so that better is the same colour as in the accuracy maps); change vs
# pretrained -DELTA_MAX..+DELTA_MAX. A value beyond a scale's end takes its end colour (the
# colour bar's arrow) and its number is written in the cell.
ECE_MAX = 50.0
DELTA_MAX = 20.0


def _scale(kind: str) -> tuple[float, float, str]:
    return (0.0, ECE_MAX, "viridis_r") if kind.endswith("_ece") else (0.0, 100.0, "viridis")


def _figure(matrix: Matrix):
    width = max(5.0, 1.0 + 1.05 * len(matrix.columns))
    height = max(2.5, 1.2 + 0.55 * len(matrix.rows))
    return plt.subplots(figsize=(width, height))


def _annotate(ax, values: np.ndarray, image, fmt: str) -> None:
    for (i, j), v in np.ndenumerate(values):
        if math.isnan(v):
            ax.text(j, i, "–", ha="center", va="center", color="0.5", fontsize=9)
            continue
        rgba = image.cmap(image.norm(v))
        light = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2] > 0.55
        ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=9, color="black" if light else "white")


def _decorate(ax, rows: Sequence[str], columns: Sequence[str], pretrained_first: bool, title: str) -> None:
    ax.set_xticks(range(len(columns)), labels=columns, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), labels=[f"after {r}" if r != "pretrained" else r for r in rows])
    ax.set_xlabel("evaluated on")
    ax.set_title(title)
    if pretrained_first:
        ax.axhline(0.5, color="white", linewidth=4)
    for i, r in enumerate(rows):  # outline the cell of each task right after it was trained
        if r in columns:
            ax.add_patch(Rectangle((columns.index(r) - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black",
                                   linewidth=2))


@matplotlib.rc_context(PLAIN_TEXT)
def build_heatmap(matrix: Matrix, title: str, kind: str = "lp"):
    """The matrix as an annotated heatmap on its kind's fixed colour scale (`_scale`)."""
    values = matrix.array()
    vmin, vmax, cmap = _scale(kind)
    fig, ax = _figure(matrix)
    image = ax.imshow(np.ma.masked_invalid(values), cmap=plt.get_cmap(cmap).with_extremes(bad="0.92"),
                      aspect="auto", vmin=vmin, vmax=vmax)
    _annotate(ax, values, image, ".1f")
    _decorate(ax, matrix.rows, matrix.columns, matrix.has_pretrained, title)
    beyond = np.isfinite(values).any() and np.nanmax(values) > vmax
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, extend="max" if beyond else "neither")
    return fig


def heatmap(matrix: Matrix, path: Path, title: str, fmt: str = "png", kind: str = "lp") -> Path:
    return save(build_heatmap(matrix, title, kind), path, fmt)


@matplotlib.rc_context(PLAIN_TEXT)
def build_delta_heatmap(matrix: Matrix, title: str):
    """Each row after a task minus the pretrained row; diverging colours centred on 0, fixed at
    ±DELTA_MAX points."""
    values = matrix.array()
    delta = values[1:] - values[0]
    rows = matrix.rows[1:]
    fig, ax = _figure(Matrix(rows, matrix.columns, delta.tolist()))
    image = ax.imshow(np.ma.masked_invalid(delta), cmap=plt.get_cmap("RdBu").with_extremes(bad="0.92"), aspect="auto",
                      norm=TwoSlopeNorm(vcenter=0.0, vmin=-DELTA_MAX, vmax=DELTA_MAX))
    _annotate(ax, delta, image, "+.1f")
    _decorate(ax, rows, matrix.columns, False, title)
    beyond = np.isfinite(delta).any() and np.nanmax(np.abs(delta)) > DELTA_MAX
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="points vs pretrained",
                 extend="both" if beyond else "neither")
    return fig


def delta_heatmap(matrix: Matrix, path: Path, title: str, fmt: str = "png") -> Path:
    return save(build_delta_heatmap(matrix, title), path, fmt)


def run_label(run_dir: Path) -> str:
    """"<run> (<strategy>)" from the run's config.yaml; the folder name alone if it cannot be read."""
    try:
        strategy = read_yaml_mapping(run_dir / "config.yaml", "config.yaml")["strategies"][0]
    except (CfbenchError, KeyError, IndexError, TypeError):
        return run_dir.name
    return run_dir.name if str(strategy) == run_dir.name else f"{run_dir.name} ({strategy})"


def plot_run(run_dir: Path, fmt: str = "png") -> list[Path]:
    """Redraw a run's figures from its CSVs alone: heatmap_<kind> (always PNG, and `fmt`),
    heatmap_delta_<kind> for lp / zs, and curves_<kind>: accuracy on each dataset after each task."""
    written = []
    formats = ["png"] + ([fmt] if fmt != "png" else [])
    label = run_label(run_dir)
    # every matrix read (and refused) before the first figure: a bad one leaves no figures half-drawn
    matrices = {p.stem: Matrix.load(p) for p in matrix_files(run_dir / "matrices")}
    for kind, matrix in matrices.items():
        if not matrix.rows:
            continue
        for f in formats:
            written.append(heatmap(matrix, run_dir / f"heatmap_{kind}", f"{label}: {TITLES.get(kind, kind)}", f, kind))
            if matrix.has_pretrained and len(matrix.rows) > 1 and kind in ("lp", "zs"):
                written.append(delta_heatmap(matrix, run_dir / f"heatmap_delta_{kind}",
                                             f"{label}: change vs pretrained, {TITLES[kind]}", f))
            if kind in ("lp", "zs", "head"):
                group = RunGroup(label, [run_dir.name], [0], [{kind: matrix}], [{}])
                written.append(curves_figure([group], kind, run_dir / f"curves_{kind}", f, caption=label))
    return written
