"""Comparison figures: forgetting first, accuracy apart, accuracy over the sequence.

Runs that differ only in their seed form one group (a strategy's n seeds): bars show the mean
and error bars the sample standard deviation (n > 1), curves the mean and a ±std band.
"""
from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..config import MACHINE_SETTINGS
from ..evaluation.matrix import PRETRAINED, Matrix
from ..files import atomic_write_bytes

# labels are dataset and run names: "$" in one is a character, not mathtext (which may fail to parse)
PLAIN_TEXT = {"text.parse_math": False}

FORMATS = ("png", "pdf", "svg")
ACCURACY_METRICS = (("avg", "Avg"), ("last", "Last"), ("transfer", "Transfer"))
KIND_LABELS = {"lp": "linear-probe", "zs": "zero-shot", "head": "task-head"}


@dataclass
class RunGroup:
    """Runs sharing every setting but the seed."""

    label: str
    runs: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    matrices: list[dict[str, Matrix]] = field(default_factory=list)
    metrics: list[dict] = field(default_factory=list)
    name: str = ""              # a file-name-safe name: the first run's name without its -s<seed>
    strategy: str = ""

    @property
    def n(self) -> int:
        return len(self.runs)

    def stat(self, values: Sequence[Optional[float]]) -> tuple[float, float]:
        """(mean, sample std) over the runs' values; NaN when none is known, std 0 for one."""
        known = np.array([v for v in values if v is not None and not math.isnan(v)], dtype=float)
        if not known.size:
            return math.nan, math.nan
        return float(known.mean()), float(known.std(ddof=1)) if known.size > 1 else 0.0

    def metric(self, kind: str, key: str) -> tuple[float, float]:
        return self.stat([m.get(kind, {}).get(key) for m in self.metrics])

    def stack(self, kind: str) -> Optional[np.ndarray]:
        """(runs, rows, columns) of one matrix kind; None unless every run has it with one layout."""
        found = [m.get(kind) for m in self.matrices]
        if not found or any(m is None for m in found) or len({(tuple(m.rows), tuple(m.columns)) for m in found}) != 1:
            return None
        return np.stack([m.array() for m in found])


# the seed, and the settings that describe the machine rather than the experiment (as --resume)
NOT_GROUPED = ("seed", "out", *MACHINE_SETTINGS)


def group_key(cfg: dict) -> str:
    import json

    return json.dumps({k: v for k, v in cfg.items() if k not in NOT_GROUPED}, sort_keys=True, default=str)


def describe_runs(cfgs: Sequence[dict], groups: Sequence[RunGroup]) -> str:
    """One line naming what the compared runs ran: model, tasks, epochs and seeds per group (each
    setting once if the runs share it, else every value)."""
    def one(values: list[str]) -> str:
        unique = list(dict.fromkeys(values))
        return unique[0] if len(unique) == 1 else " | ".join(unique)

    def model(cfg: dict) -> str:
        m = cfg.get("model") or {}
        weights = m.get("pretrained")
        weights = Path(str(weights)).name if weights and ("/" in str(weights) or "." in str(weights)) else weights
        return f"{m['name']}" + (f" ({weights})" if weights else "") if m.get("name") else "model ?"

    def tasks(cfg: dict) -> str:
        trained = cfg.get("tasks") or [cfg.get("sequence", "?")]
        extra = cfg.get("eval_only") or []
        return " → ".join(map(str, trained)) + (f" (+ never trained: {', '.join(map(str, extra))})" if extra else "")

    def epochs(cfg: dict) -> str:
        train = cfg.get("train") or {}
        value = train.get("iterations") or train.get("epochs")
        unit = "iterations" if train.get("iterations") else "epochs"
        if isinstance(value, dict):
            return f"{unit} per task " + ", ".join(f"{k} {v}" for k, v in value.items())
        return f"{value} {unit[:-1] if value == 1 else unit}" if value is not None else "epochs ?"

    seeds = sorted({g.n for g in groups})
    counted = f"{seeds[0]} seed{'s' if seeds[0] > 1 else ''} per strategy" if len(seeds) == 1 else \
        f"{seeds[0]}-{seeds[-1]} seeds per strategy"
    return " · ".join([one([model(c) for c in cfgs]), one([tasks(c) for c in cfgs]), one([epochs(c) for c in cfgs]),
                       counted])


def _seedless(run: str, seed) -> str:
    suffix = f"-s{seed}"
    return run[:-len(suffix)] if run.endswith(suffix) and len(run) > len(suffix) else run


def group_runs(runs: Sequence[tuple[str, dict, dict, dict[str, Matrix]]]) -> list[RunGroup]:
    """(run name, config, metrics, matrices) -> groups in first-seen order, labelled by strategy;
    where two groups share a strategy, by their name (the first run's name without -s<seed>, as a
    sweep's ldifs-alpha10), else the strategy plus the first run's name."""
    groups: dict[str, RunGroup] = {}
    for name, cfg, metrics, matrices in runs:
        g = groups.setdefault(group_key(cfg), RunGroup(cfg["strategies"][0], strategy=cfg["strategies"][0]))
        g.runs.append(name)
        g.seeds.append(cfg.get("seed", 0))
        g.matrices.append(matrices)
        g.metrics.append(metrics)
    out = list(groups.values())
    names: list[str] = []
    for g in out:
        name = _seedless(g.runs[0], g.seeds[0])
        name = name if name not in names else g.runs[0]
        k = 2
        while name in names:
            name, k = f"{_seedless(g.runs[0], g.seeds[0])}-{k}", k + 1
        g.name = name
        names.append(name)
    labels = [g.label for g in out]
    for g in out:
        if labels.count(g.label) > 1:  # e.g. a sweep's ldifs-alpha1 and ldifs-alpha10
            g.label = g.name if g.name == _seedless(g.runs[0], g.seeds[0]) else f"{g.label} ({g.runs[0]})"
    return out


def save(fig, path: Path, fmt: str = "png") -> Path:
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    path = path.with_suffix(f".{fmt}")
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=130, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def untrained_deltas(group: RunGroup, kind: str) -> tuple[list[str], np.ndarray]:
    """Never-trained columns and, per run, last row minus pretrained row on them (runs, cols)."""
    stack = group.stack(kind)
    first = group.matrices[0].get(kind) if group.matrices else None
    if stack is None or first is None or not first.has_pretrained or len(first.rows) < 2:
        return [], np.empty((0, 0))
    trained = set(first.rows[1:])
    cols = [i for i, c in enumerate(first.columns) if c not in trained]
    return [first.columns[i] for i in cols], stack[:, -1, cols] - stack[:, 0, cols]


def _bars(ax, groups: Sequence[RunGroup], categories: Sequence[str],
          values: list[list[tuple[float, float]]]) -> list[np.ndarray]:
    """Grouped bars: one group of bars per category, one bar per run group, error bars = std;
    returns each group's bar positions."""
    width = 0.8 / max(1, len(groups))
    positions = []
    for i, g in enumerate(groups):
        means = [values[i][j][0] for j in range(len(categories))]
        stds = [values[i][j][1] if g.n > 1 else 0.0 for j in range(len(categories))]
        x = np.arange(len(categories)) + (i - (len(groups) - 1) / 2) * width
        bars = ax.bar(x, means, width, yerr=stds if g.n > 1 else None, capsize=3,
                      label=f"{g.label} (n={g.n})" if g.n > 1 else g.label)
        ax.bar_label(bars, fmt="%+.1f" if ax.get_label() == "forgetting" else "%.1f", fontsize=7, padding=2)
        positions.append(x)
    ax.set_xticks(range(len(categories)), labels=categories, rotation=20, ha="right")
    return positions


def comparison_figure(groups: Sequence[RunGroup], path: Path, fmt: str = "png", kind: str = "lp",
                      caption: str = "") -> Path:
    return save(build_comparison(groups, kind, caption=caption), path, fmt)


def accuracy_limits(values: Sequence[float], floor: float = 4.0) -> tuple[float, float]:
    """A y-range around `values` inside 0-100, at least `floor` points tall, so that 94.4 and 95.6
    look apart (an axis from 0 would flatten them); the axis says where it starts."""
    known = [v for v in values if v is not None and not math.isnan(v)]
    if not known:
        return 0.0, 100.0
    lo, hi = min(known), max(known)
    pad = max((floor - (hi - lo)) / 2, 0.12 * (hi - lo), 0.5)
    lo, hi = max(0.0, lo - pad), min(100.0, hi + pad)
    return (lo, hi) if hi - lo >= floor else ((0.0, floor) if lo == 0.0 else (100.0 - floor, 100.0))


def _points(ax, groups: Sequence[RunGroup], categories: Sequence[str],
            values: list[list[tuple[float, float]]]) -> list[np.ndarray]:
    """Mean (dot) and sample std (error bar) of each group per category, value written beside it;
    returns each group's x positions. Dots, not bars: the axis is zoomed to the values."""
    width = 0.8 / max(1, len(groups))
    positions = []
    for i, g in enumerate(groups):
        means = np.array([values[i][j][0] for j in range(len(categories))], dtype=float)
        stds = np.array([values[i][j][1] if g.n > 1 else 0.0 for j in range(len(categories))], dtype=float)
        x = np.arange(len(categories)) + (i - (len(groups) - 1) / 2) * width
        ax.errorbar(x, means, yerr=stds if g.n > 1 else None, fmt="o", capsize=3, markersize=6,
                    label=f"{g.label} (n={g.n})" if g.n > 1 else g.label)
        for xi, mean in zip(x, means):
            if not math.isnan(mean):
                ax.annotate(f"{mean:.1f}", (xi, mean), xytext=(5, 0), textcoords="offset points", fontsize=7,
                            va="center")
        positions.append(x)
    ax.set_xticks(range(len(categories)), labels=categories)
    ax.set_xlim(-0.6, len(categories) - 0.4)
    return positions


@matplotlib.rc_context(PLAIN_TEXT)
def build_comparison(groups: Sequence[RunGroup], kind: str = "lp",
                     published: Optional[Sequence[Optional[dict[str, float]]]] = None, caption: str = ""):
    """Left: change vs pretrained on each never-trained dataset and their mean, symmetric around
    zero. Right: Avg and Last (the trained tasks) and Transfer (tasks not yet trained) as dots with
    sample-std error bars on an axis zoomed to the values; `published` (one per group, None for
    none) marks a paper's value of each metric with a black star. `caption`: what was run."""
    columns: list[str] = []
    for g in groups:
        columns += [c for c in untrained_deltas(g, kind)[0] if c not in columns]
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(9.0, 3.0 + 1.2 * (len(columns) + 4)), 4.6),
                                      gridspec_kw={"width_ratios": [max(2, len(columns) + 1), 3]})
    left.set_label("forgetting")
    categories = columns + ["mean"]
    values = []
    for g in groups:
        names, delta = untrained_deltas(g, kind)
        per = [g.stat(delta[:, names.index(c)].tolist()) if c in names else (math.nan, math.nan) for c in columns]
        per.append(g.stat(np.nanmean(delta, axis=1).tolist()) if delta.size else (math.nan, math.nan))
        values.append(per)
    if columns:
        _bars(left, groups, categories, values)
        reach = np.nanmax([abs(m) + (s if not math.isnan(s) else 0) for v in values for m, s in v] + [0.5])
        left.set_ylim(-1.25 * reach, 1.25 * reach)
    else:
        left.text(0.5, 0.5, "no never-trained dataset\n(or no pretrained row)", ha="center", va="center",
                  transform=left.transAxes)
        left.set_xticks([])
        left.set_yticks([])
    left.axhline(0, color="black", linewidth=0.8)
    left.set_ylabel(f"Δ {KIND_LABELS.get(kind, kind)} accuracy vs pretrained (points)")
    left.set_title("concept forgetting\nnever-trained datasets (0 = pretrained)", fontsize=10)
    right.set_label("accuracy")
    acc = [[g.metric(kind, key) for key, _ in ACCURACY_METRICS] for g in groups]
    positions = _points(right, groups, [label for _, label in ACCURACY_METRICS], acc)
    marked = [(x, value) for i, values in enumerate(published or []) if values
              for x, (key, _) in zip(positions[i], ACCURACY_METRICS) if (value := values.get(key)) is not None]
    if marked:
        right.scatter(*zip(*marked), marker="*", s=60, color="black", zorder=3, label="published")
    lo, hi = accuracy_limits([m + sign * (s if not math.isnan(s) else 0) for row in acc for m, s in row
                              for sign in (-1, 1)] + [y for _, y in marked])
    right.set_ylim(lo, hi + (0.03 * (hi - lo) if hi >= 100 else 0))  # room for a dot at 100
    right.set_ylabel(f"{KIND_LABELS.get(kind, kind)} accuracy (%)" + (f", axis from {lo:.0f}" if lo > 0 else ""))
    right.set_title("Avg, Last: trained tasks\nTransfer: tasks before their training", fontsize=10)
    fig.subplots_adjust(wspace=0.3)
    handles, labels = right.get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(4, len(labels)), fontsize=8, bbox_to_anchor=(0.5, 1.08))
    if caption:
        fig.text(0.5, -0.02, caption, ha="center", va="top", fontsize=8, color="0.25")
    return fig


def curves_figure(groups: Sequence[RunGroup], kind: str, path: Path, fmt: str = "png",
                  caption: str = "") -> Optional[Path]:
    fig = build_curves(groups, kind, caption)
    return None if fig is None else save(fig, path, fmt)


def panel_grid(n: int, panel_width: float):
    """A figure of n panels, four to a row, and its n axes in order; the grid's spare panels hidden."""
    ncols = min(4, n)
    nrows = math.ceil(n / ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(panel_width * ncols, 3.0 * nrows + 0.8), squeeze=False)
    axes = list(grid.flat)
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


@matplotlib.rc_context(PLAIN_TEXT)
def build_curves(groups: Sequence[RunGroup], kind: str, caption: str = ""):
    """One panel per evaluated dataset: accuracy after each stage (pretrained, then each task),
    one line per group (mean, ±std band), the pretrained value as a dashed reference. Every panel
    shares one y-range inside 0-100 (a 0.7-point change looks like one everywhere); panels of
    never-trained datasets are shaded and say so."""
    drawn = [(g, g.stack(kind), g.matrices[0][kind]) for g in groups if g.stack(kind) is not None]
    if not drawn:
        return None
    columns = drawn[0][2].columns
    trained = set(drawn[0][2].rows) - {PRETRAINED}
    fig, axes = panel_grid(len(columns), 3.4)
    ncols = min(4, len(columns))
    shown: list[float] = []
    for ax, (j, column) in zip(axes, enumerate(columns)):
        for g, stack, first in drawn:
            if column not in first.columns:
                continue
            values = stack[:, :, first.columns.index(column)]
            with warnings.catch_warnings():  # stages where a dataset has no value (head matrices)
                warnings.simplefilter("ignore", RuntimeWarning)
                mean = np.nanmean(values, axis=0)
                std = np.nanstd(values, axis=0, ddof=1) if g.n > 1 else None
            x = np.arange(len(first.rows))
            line, = ax.plot(x, mean, marker="o", markersize=3, label=f"{g.label} (n={g.n})" if g.n > 1 else g.label)
            shown += mean.tolist()
            if std is not None:
                ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
                shown += (mean - std).tolist() + (mean + std).tolist()
            if first.has_pretrained and not math.isnan(mean[0]):
                ax.axhline(mean[0], color="0.4", linestyle="--", linewidth=0.8)
        if column in trained:
            ax.set_title(f"{column} (trained)", fontsize=9)
        else:
            ax.set_title(f"{column} (never trained)", fontsize=9)
            ax.set_facecolor("0.95")
        rows = drawn[0][2].rows
        ax.set_xticks(range(len(rows)), labels=["pretrained" if r == PRETRAINED else r for r in rows], rotation=45,
                      ha="right", fontsize=7)
        ax.set_xlabel("after task", fontsize=8)
        if j % ncols == 0:
            ax.set_ylabel("accuracy (%)")
    lo, hi = accuracy_limits(shown, floor=10.0)
    for ax in axes:
        ax.set_ylim(lo, hi)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.suptitle(f"{KIND_LABELS.get(kind, kind)} accuracy after each task (dashed: pretrained; "
                 f"one y-axis for all panels, {lo:.0f}-{hi:.0f}%)" + (f"\n{caption}" if caption else ""), fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8, frameon=False)
    return fig
