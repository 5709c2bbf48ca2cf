"""Finishing a run (metrics.json, heatmaps) and comparing finished runs."""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Optional

import numpy as np

from ..config import experiment_digest
from ..config.deviations import count_label
from ..errors import CfbenchError
from ..evaluation.matrix import PRETRAINED, Matrix
from ..evaluation.metrics import METRIC_KEYS, compute_metrics
from ..evaluation.within import PREFIX, Curve, matrix_files
from ..files import atomic_write_json, atomic_write_text
from ..records import read_deviations, read_metrics, read_progress, read_run_config_for_reports
from .figures import comparison_figure, curves_figure, describe_runs, group_runs
from .plots import TITLES, heatmap, plot_run
from .published import write_reference_comparison
from .references import load_reference
from .run_folder import DEVIATIONS, write_progress
from .within import plot_within, read_curves, within_figure

# what compare_runs writes into its folder (name prefixes)
COMPARE_OUTPUTS = ("comparison", "curves_", "groups", "table3", "reference_", "within_")

COMPARE_COLUMNS = [("lp", "avg", "LP Avg"), ("lp", "last", "LP Last"), ("lp", "transfer", "LP Transfer"),
                   ("lp", "bwt", "LP BWT"), ("lp", "forgetting", "LP Forgetting"),
                   ("lp", "delta_untrained", "ΔLP untrained"), ("lp", "delta_all", "ΔLP all"),
                   ("head", "avg", "Head Avg"), ("head", "last", "Head Last")]
LOWER_IS_BETTER = {"LP Forgetting"}


def run_metrics(run_dir: Path) -> dict:
    """Metrics of every matrix, computed from the CSVs exactly as `cfbench metrics` would."""
    out = {}
    for csv_path in matrix_files(run_dir / "matrices"):
        out[csv_path.stem] = compute_metrics(Matrix.load(csv_path))
    return out


def _matrices(run_dir: Path) -> dict[str, Matrix]:
    return {p.stem: Matrix.load(p) for p in matrix_files(run_dir / "matrices")}


def latex_table(header: list[str], rows: list[list], text_columns: int = 3) -> str:
    """A booktabs table of the comparison rows (same numbers as comparison.csv, 2 decimals); the
    best value of each numeric column in bold (lowest for forgetting, highest otherwise); a run that
    differs from its protocol (the protocol column says "+ N changes") marked with a dagger."""
    def tex(text: str) -> str:
        return str(text).replace("\\", r"\textbackslash{}").replace("_", r"\_").replace("%", r"\%") \
            .replace("&", r"\&").replace("#", r"\#").replace("Δ", r"$\Delta$")

    best = {}
    for j, name in enumerate(header[text_columns:], start=text_columns):
        known = [row[j] for row in rows if isinstance(row[j], (int, float))]
        if known:
            best[j] = min(known) if name in LOWER_IS_BETTER else max(known)
    lines = [r"\begin{tabular}{" + "l" * text_columns + "r" * (len(header) - text_columns) + "}", r"\toprule",
             " & ".join(tex(h) for h in header) + r" \\", r"\midrule"]
    marked = False
    for row in rows:
        off = "+" in str(row[2])
        marked |= off
        cells = [tex(row[0]) + (r"$^\dagger$" if off else "")] + [tex(v) for v in row[1:text_columns]]
        for j, v in enumerate(row[text_columns:], start=text_columns):
            if not isinstance(v, (int, float)):
                cells.append("--")
                continue
            text = f"{v:.2f}"
            cells.append(rf"\textbf{{{text}}}" if f"{best[j]:.2f}" == text else text)
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    if marked:
        lines.append(r"% $^\dagger$ differs from its protocol: see the run's deviations.json")
    return "\n".join(lines) + "\n"


def finalize_run(run_dir: Path, matrices: dict[str, Matrix], run_cfg: dict, model_has_text: bool,
                 curves: Optional[dict[str, Curve]] = None) -> dict:
    """Writes the matrices (and within-task curves), metrics.json, the figures and the finished
    progress.json; returns the metrics."""
    for kind, matrix in matrices.items():
        matrix.save(run_dir / "matrices" / f"{kind}.csv")
    for kind, curve in (curves or {}).items():
        curve.save(run_dir / "matrices" / f"{PREFIX}{kind}.csv")
    metrics = run_metrics(run_dir)
    if not model_has_text:
        metrics["notes"] = [f"no zero-shot (zs) matrix: {run_cfg['model']['name']} has no text tower"]
    atomic_write_json(run_dir / "metrics.json", metrics)
    if run_cfg.get("figures", True):
        plot_run(run_dir)
        plot_within(run_dir)
    write_progress(run_dir, matrices["lp"].rows[1:], True, experiment_digest(run_cfg))
    return metrics


def _finished_run(run_dir: Path) -> tuple[dict, dict]:
    if not run_dir.is_dir():
        raise CfbenchError(f"{run_dir}: no such run folder")
    if not (run_dir / "config.yaml").exists():
        raise CfbenchError(f"{run_dir}: neither a run folder (no config.yaml) nor an invocation folder holding runs; "
                           "pass the run folders, or the folder `cfbench run` printed as results:")
    progress = run_dir / "progress.json"
    if not (run_dir / "metrics.json").is_file() or not progress.is_file() or not read_progress(progress)["finished"]:
        raise CfbenchError(f"{run_dir}: not a finished run (no metrics.json or progress.json says unfinished)")
    cfg = read_run_config_for_reports(run_dir / "config.yaml")
    return cfg, read_metrics(run_dir / "metrics.json")


def protocol_label(run_dir: Path, cfg: dict) -> str:
    """`ldifs` for a run that is its protocol, `ldifs + 2 changes` otherwise (deviations.json);
    `ldifs (unchecked)` for a folder written before runs recorded their deviations."""

    protocol = cfg.get("protocol", "unknown")
    path = run_dir / DEVIATIONS
    if not path.is_file():
        return f"{protocol} (unchecked)"
    found = read_deviations(path)
    return f"{protocol} + {count_label(len(found))}" if found else str(protocol)


def zscl_table3(runs: list[tuple[str, Matrix]]) -> str:
    """ZSCL's Table 3 layout for (strategy, zero-shot matrix) pairs over the same sequence: per
    strategy a Transfer, an Avg and a Last row, one column per trained dataset plus their average.
    Transfer_j = mean over t < j of A[t, j] (none for the first task), Avg_j = mean over t of
    A[t, j], Last_j = A[T, j] (A: rows after each task, no pretrained row; README "Metrics")."""
    names = [r for r in runs[0][1].rows if r != PRETRAINED]
    header = ["method", "metric", *names, "average"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for strategy, matrix in runs:
        A = matrix.array()[1:] if matrix.has_pretrained else matrix.array()
        cols = [matrix.columns.index(n) for n in names]
        A = A[:, cols]
        per = {"Transfer": [None] + [float(np.mean(A[:j, j])) for j in range(1, len(names))],
               "Avg": [float(np.mean(A[:, j])) for j in range(len(names))],
               "Last": [float(A[-1, j]) for j in range(len(names))]}
        for metric, values in per.items():
            known = [v for v in values if v is not None]
            cells = ["–" if v is None else f"{v:.1f}" for v in values] + [f"{np.mean(known):.1f}"]
            lines.append("| " + " | ".join([strategy, metric, *cells]) + " |")
    return "\n".join(lines) + "\n"


def _is_mtil(cfg: dict) -> bool:
    return cfg.get("protocol") == "zscl-mtil" or str(cfg.get("sequence", "")).startswith("mtil")


KIND_ORDER = ("lp", "head", "zs", "lp_ece", "zs_ece")


def group_stat(values) -> tuple[Optional[float], Optional[float], int]:
    """(mean, sample std (ddof=1), n) over the known values; std None for n = 1, all None for n = 0."""
    known = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)
             and not np.isnan(v)]
    if not known:
        return None, None, 0
    return float(np.mean(known)), (float(np.std(known, ddof=1)) if len(known) > 1 else None), len(known)


def _metric_keys(groups) -> list[tuple[str, str]]:
    """Every numeric (kind, metric) of the runs' metrics.json, matrix kinds and metrics in a fixed order."""

    found = {(kind, key) for g in groups for m in g.metrics for kind, values in m.items() if isinstance(values, dict)
             for key, v in values.items() if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))}
    rank = lambda kind, key: (KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER), kind,  # noqa: E731
                              METRIC_KEYS.index(key) if key in METRIC_KEYS else len(METRIC_KEYS), key)
    return sorted(found, key=lambda k: rank(*k))


def group_tables(groups) -> tuple[str, str]:
    """(Markdown, CSV) of the runs grouped over seeds: per group its n runs and seeds; Markdown:
    the comparison's columns as mean ± sample std (std blank for n = 1); CSV: every metric of
    metrics.json as mean, std and n."""
    def fmt(mean, std) -> str:
        return "n/a" if mean is None else (f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}")

    header = ["group", "strategy", "n", "seeds", *(label for _, _, label in COMPARE_COLUMNS)]
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    keys = _metric_keys(groups)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["group", "strategy", "n", "seeds", "runs",
                     *(f"{kind}.{key} {what}" for kind, key in keys for what in ("mean", "std", "n"))])
    for g in groups:
        cells = [fmt(*group_stat([m.get(kind, {}).get(key) for m in g.metrics])[:2])
                 for kind, key, _ in COMPARE_COLUMNS]
        md.append("| " + " | ".join([g.name, g.strategy, str(g.n), ", ".join(map(str, g.seeds)), *cells]) + " |")
        row = [g.name, g.strategy, g.n, " ".join(map(str, g.seeds)), " ".join(g.runs)]
        for kind, key in keys:
            mean, std, n = group_stat([m.get(kind, {}).get(key) for m in g.metrics])
            row += ["" if mean is None else mean, "" if std is None else std, n]
        writer.writerow(row)
    return "\n".join(md) + "\n", buf.getvalue()


def write_group_matrices(groups, out_dir: Path, fmt: str = "png") -> list[Path]:
    """For each group of n >= 2 runs: groups/<group>/mean_<kind>.csv, std_<kind>.csv (sample std)
    and heatmap_mean_<kind>.<fmt>, every matrix kind the group's runs share."""
    import warnings

    written = []
    for g in groups:
        if g.n < 2:
            continue
        kinds = sorted({k for m in g.matrices for k in m},
                       key=lambda k: (KIND_ORDER.index(k) if k in KIND_ORDER else len(KIND_ORDER), k))
        for kind in kinds:
            stack = g.stack(kind)
            if stack is None:
                continue
            first = g.matrices[0][kind]
            with warnings.catch_warnings():  # cells blank in every run (head matrices)
                warnings.simplefilter("ignore", RuntimeWarning)
                mean, std = np.nanmean(stack, axis=0), np.nanstd(stack, axis=0, ddof=1)
            folder = out_dir / "groups" / g.name
            Matrix(first.rows, first.columns, mean.tolist()).save(folder / f"mean_{kind}.csv")
            Matrix(first.rows, first.columns, std.tolist()).save(folder / f"std_{kind}.csv")
            written.append(heatmap(Matrix(first.rows, first.columns, mean.tolist()), folder / f"heatmap_mean_{kind}",
                                   f"{g.name if g.name == g.strategy else f'{g.name} ({g.strategy})'}, mean of "
                                   f"{g.n} seeds: {TITLES.get(kind, kind)}", fmt,
                                   kind))
    return written


def compare_runs(run_dirs: list[Path], out_dir: Path, fmt: str = "png", latex: bool = False,
                 groups: Optional[bool] = None, reference: Optional[str] = None,
                 figures: Optional[bool] = True) -> str:
    """Writes comparison.md, comparison.csv, the figures comparison.<fmt> (forgetting on the
    never-trained datasets | accuracy) and curves_<kind>.<fmt> (accuracy after each task), with
    `latex` comparison.tex (and, for MTIL runs with zero-shot matrices, table3.md in ZSCL's
    layout); when runs differ only in their seed (or `groups`), comparison_groups.md/.csv (mean,
    sample std, n) and each group's mean matrices and heatmaps under groups/; with `reference`
    (benchmark/references/NAME.yaml) the runs beside its published numbers, reference_NAME.md/.csv
    (.tex) and .<fmt>; `figures` false: the tables alone (None: unless a run's config says
    figures: false); returns the Markdown printed (and the LaTeX)."""
    if not run_dirs:
        raise CfbenchError("compare needs at least one run directory")
    published = load_reference(reference) if reference is not None else None  # refused before anything is written
    header = ["run", "strategy", "protocol", *(label for _, _, label in COMPARE_COLUMNS)]
    rows: list[list] = []
    mtil: list[tuple[str, Matrix]] = []
    runs = []
    curves: dict[Path, dict[str, Curve]] = {}
    for run_dir in run_dirs:  # everything read (and refused) before the first file is written
        cfg, metrics = _finished_run(run_dir)
        runs.append((run_dir.name, cfg, metrics, _matrices(run_dir)))
        curves[run_dir] = read_curves(run_dir)
        if _is_mtil(cfg) and (run_dir / "matrices/zs.csv").is_file():
            mtil.append((cfg["strategies"][0], Matrix.load(run_dir / "matrices/zs.csv")))
        values: list[Optional[float]] = [metrics.get(kind, {}).get(key) for kind, key, _ in COMPARE_COLUMNS]
        rows.append([run_dir.name, cfg["strategies"][0], protocol_label(run_dir, cfg), *values])
    cell = lambda v: "n/a" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))  # noqa: E731
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    table = "\n".join(md) + "\n"
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([[("" if v is None else v) for v in row] for row in rows])
    atomic_write_text(out_dir / "comparison.md", table)
    atomic_write_text(out_dir / "comparison.csv", buf.getvalue())
    run_groups = group_runs(runs)
    if figures is None:
        figures = all(cfg.get("figures", True) is not False for _, cfg, _, _ in runs)
    if figures:
        caption = describe_runs([cfg for _, cfg, _, _ in runs], run_groups)
        comparison_figure(run_groups, out_dir / "comparison", fmt, caption=caption)
        for kind in ("lp", "zs"):
            curves_figure(run_groups, kind, out_dir / f"curves_{kind}", fmt, caption=caption)
        for kind in sorted(set.intersection(*(set(curves[d]) for d in run_dirs))):
            within_figure([(d.name, curves[d][kind]) for d in run_dirs], kind, out_dir / f"within_{kind}", fmt)
    if groups or (groups is None and any(g.n > 1 for g in run_groups)):
        grouped_md, grouped_csv = group_tables(run_groups)
        atomic_write_text(out_dir / "comparison_groups.md", grouped_md)
        atomic_write_text(out_dir / "comparison_groups.csv", grouped_csv)
        write_group_matrices(run_groups, out_dir, fmt)
        table += "\nGrouped over seeds (comparison_groups.md; mean ± sample std, n runs):\n\n" + grouped_md
    if latex:
        tex = latex_table(header, rows)
        atomic_write_text(out_dir / "comparison.tex", tex)
        table += "\n" + tex
    if mtil and len(mtil) == len(run_dirs) and len({tuple(m.rows) for _, m in mtil}) == 1:
        table3 = zscl_table3(mtil)
        atomic_write_text(out_dir / "table3.md", table3)
        table += "\nZero-shot accuracy in ZSCL's Table 3 layout (table3.md):\n\n" + table3
    if published is not None:
        labelled = [(name, cfg, row[2], matrices) for (name, cfg, _, matrices), row in zip(runs, rows)]
        table += f"\nBeside the published numbers (reference_{published.name}.md):\n\n" + write_reference_comparison(
            published, labelled, run_groups, out_dir, fmt, latex)
    return table
