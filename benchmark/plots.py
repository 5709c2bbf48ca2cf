"""Heatmaps of a run's matrices and the cross-run comparison chart (matplotlib, PNG)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from .store import Matrix, atomic_write_bytes  # noqa: E402

TITLES = {"lp": "linear-probe accuracy (%)", "head": "task-head accuracy (%)", "zs": "zero-shot accuracy (%)",
          "lp_ece": "linear-probe calibration error (%)", "zs_ece": "zero-shot calibration error (%)"}


def _save(fig, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=130, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


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


def heatmap(matrix: Matrix, path: Path, title: str) -> None:
    values = matrix.array()
    fig, ax = _figure(matrix)
    image = ax.imshow(np.ma.masked_invalid(values), cmap=plt.get_cmap("viridis").with_extremes(bad="0.92"),
                      aspect="auto",
                      vmin=np.nanmin(values) if np.isfinite(values).any() else 0,
                      vmax=np.nanmax(values) if np.isfinite(values).any() else 100)
    _annotate(ax, values, image, ".1f")
    _decorate(ax, matrix.rows, matrix.columns, matrix.has_pretrained, title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    _save(fig, path)


def delta_heatmap(matrix: Matrix, path: Path, title: str) -> None:
    """Each row after a task minus the pretrained row; diverging colours centred on 0."""
    values = matrix.array()
    delta = values[1:] - values[0]
    rows = matrix.rows[1:]
    limit = max(1.0, float(np.nanmax(np.abs(delta)))) if np.isfinite(delta).any() else 1.0
    fig, ax = _figure(Matrix(rows, matrix.columns, delta.tolist()))
    image = ax.imshow(np.ma.masked_invalid(delta), cmap=plt.get_cmap("RdBu").with_extremes(bad="0.92"), aspect="auto",
                      norm=TwoSlopeNorm(vcenter=0.0, vmin=-limit, vmax=limit))
    _annotate(ax, delta, image, "+.1f")
    _decorate(ax, rows, matrix.columns, False, title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="points vs pretrained")
    _save(fig, path)


def plot_run(run_dir: Path) -> list[Path]:
    """Redraw every heatmap of a run from its CSVs alone."""
    written = []
    for csv_path in sorted((run_dir / "matrices").glob("*.csv")):
        kind = csv_path.stem
        matrix = Matrix.load(csv_path)
        if not matrix.rows:
            continue
        out = run_dir / f"heatmap_{kind}.png"
        heatmap(matrix, out, TITLES.get(kind, kind))
        written.append(out)
        if matrix.has_pretrained and len(matrix.rows) > 1 and kind in ("lp", "zs"):
            out = run_dir / f"heatmap_delta_{kind}.png"
            delta_heatmap(matrix, out, f"change vs pretrained: {TITLES[kind]}")
            written.append(out)
    return written


def comparison_chart(labels: Sequence[str], metrics: dict[str, Sequence[Optional[float]]], path: Path) -> None:
    """Grouped bars: one group per metric, one bar per run."""
    names = list(metrics)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.8 * len(names)), 4.0))
    width = 0.8 / max(1, len(labels))
    for i, label in enumerate(labels):
        heights = [np.nan if metrics[m][i] is None else metrics[m][i] for m in names]
        bars = ax.bar(np.arange(len(names)) + (i - (len(labels) - 1) / 2) * width, heights, width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(names)), labels=names)
    ax.set_ylabel("percent / points")
    ax.legend(fontsize=8)
    ax.set_title("strategy comparison")
    _save(fig, path)
