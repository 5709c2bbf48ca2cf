"""Runs beside a paper's published numbers (`cfbench compare RUN... --reference NAME`): per run
whose strategy maps to a published row, the published and the measured Transfer / Avg / Last
means and their difference, measured from the run's matrix of the reference's kind with cfbench's
own metrics (the same definitions as ZSCL's results.ipynb `statistics()`: README "Metrics", no
pretrained row). The runs' pretrained row is set beside the table's zero-shot row. A run that
trained another sequence, has no such matrix or no published row is named in a warning line and
left out, never compared silently."""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ..evaluation.matrix import Matrix
from ..evaluation.metrics import compute_metrics
from ..files import atomic_write_text
from .figures import RunGroup, build_comparison, describe_runs, save
from .references import METRICS, Reference

LABELS = {"transfer": "Transfer", "avg": "Avg", "last": "Last"}
HEADER = ["run", "strategy", "protocol", "published row", "metric", "published", "measured",
          "difference (measured - published)"]


@dataclass(frozen=True)
class Line:
    run: str
    strategy: str
    protocol: str
    method: str
    metric: str                 # transfer, avg or last
    published: float
    measured: Optional[float]

    @property
    def difference(self) -> Optional[float]:
        return None if self.measured is None else self.measured - self.published


def pretrained_metrics(matrix: Matrix) -> dict[str, Optional[float]]:
    """Transfer / Avg / Last of the pretrained model, as ZSCL's zero-shot cell computes them: its
    row repeated after every task (so Avg = Last = its mean over the trained datasets, Transfer its
    mean over datasets 2..T)."""
    trained = matrix.rows[1:]
    row = matrix.array()[0].tolist()
    return compute_metrics(Matrix(list(trained), list(matrix.columns), [row] * len(trained)))


def reference_lines(reference: Reference, runs: Sequence[tuple[str, dict, str, dict[str, Matrix]]]
                    ) -> tuple[list[Line], list[str]]:
    """(lines, warnings) for (run name, config, protocol label, matrices) of finished runs."""
    lines: list[Line] = []
    warnings: list[str] = []
    seen_pretrained: set = set()
    for name, cfg, protocol, matrices in runs:
        strategy = str(cfg["strategies"][0])
        matrix = matrices.get(reference.kind)
        if matrix is None:
            warnings.append(f"{name}: no {reference.kind} matrix (matrices/{reference.kind}.csv); not compared")
            continue
        trained = tuple(matrix.rows[1:] if matrix.has_pretrained else matrix.rows)
        if trained != reference.datasets:
            label = cfg.get("sequence") or "its own task list"
            warnings.append(f"{name}: trained {label} ({', '.join(trained)}), not {reference.name}'s sequence "
                            f"{reference.sequence} ({', '.join(reference.datasets)}); not compared")
            continue
        if cfg.get("protocol") != reference.protocol:
            warnings.append(f"{name}: protocol {cfg.get('protocol', 'unknown')}, not {reference.protocol} as "
                            "published; compared, but not the published setting")
        zero_shot = reference.zero_shot
        if zero_shot is not None and matrix.has_pretrained and tuple(matrix.values[0]) not in seen_pretrained:
            seen_pretrained.add(tuple(matrix.values[0]))
            measured = pretrained_metrics(matrix)
            lines += [Line(name, "pretrained", protocol, zero_shot.method, key, zero_shot.metrics[key].mean,
                           measured[key]) for key in METRICS]
        row = reference.row_for(strategy)
        if row is None:
            known = ", ".join(r.strategy for r in reference.rows if r.strategy) or "none"
            warnings.append(f"{name}: strategy {strategy} has no published row in {reference.name} "
                            f"(strategies with one: {known}); not compared")
            continue
        measured = compute_metrics(matrix)
        lines += [Line(name, strategy, protocol, row.method, key, row.metrics[key].mean, measured[key])
                  for key in METRICS]
    return lines, warnings


def _cells(line: Line) -> list[str]:
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
    return [line.run, line.strategy, line.protocol, line.method, LABELS[line.metric], f"{line.published:.1f}",
            fmt(line.measured, ".2f"), fmt(line.difference, "+.2f")]


def _latex(lines: list[Line], caption: str) -> str:
    def tex(text: str) -> str:
        return str(text).replace("\\", r"\textbackslash{}").replace("_", r"\_").replace("%", r"\%") \
            .replace("&", r"\&").replace("#", r"\#")

    out = [f"% {caption}", r"\begin{tabular}{lllllrrr}", r"\toprule", " & ".join(tex(h) for h in HEADER) + r" \\",
           r"\midrule"]
    out += [" & ".join(tex(c) if c != "n/a" else "--" for c in _cells(line)) + r" \\" for line in lines]
    return "\n".join(out + [r"\bottomrule", r"\end{tabular}"]) + "\n"


def write_reference_comparison(reference: Reference, runs: Sequence[tuple[str, dict, str, dict[str, Matrix]]],
                               groups: Sequence[RunGroup], out_dir: Path, fmt: str = "png",
                               latex: bool = False) -> str:
    """Writes reference_<name>.md and .csv (with `latex` .tex) and the figure reference_<name>.<fmt>
    (the comparison figure of the reference's matrix kind, each published mean marked on its bar);
    returns the text printed."""
    lines, warnings = reference_lines(reference, runs)
    source = reference.source
    caption = (f"Published: {reference.name} = {reference.table}, {reference.paper}; source {source['repository']}"
               f"@{source['commit'][:7]} {source['file']}; measured: each run's {reference.kind} matrix")
    md = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    md += ["| " + " | ".join(_cells(line)) + " |" for line in lines]
    text = "\n".join([caption, *(f"warning: {w}" for w in warnings), "", *md]) + "\n"
    if not lines:
        text += "(no run could be compared with this reference)\n"
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(HEADER)
    writer.writerows([[x.run, x.strategy, x.protocol, x.method, LABELS[x.metric], x.published,
                       "" if x.measured is None else x.measured, "" if x.difference is None else x.difference]
                      for x in lines])
    stem = f"reference_{reference.name}"
    atomic_write_text(out_dir / f"{stem}.md", text)
    atomic_write_text(out_dir / f"{stem}.csv", buf.getvalue())
    if latex:
        tex = _latex(lines, caption)
        atomic_write_text(out_dir / f"{stem}.tex", tex)
        text += "\n" + tex
    compared = {x.run for x in lines if x.strategy != "pretrained"}
    marks = [{k: row.metrics[k].mean for k in METRICS}
             if (row := reference.row_for(g.strategy)) is not None and set(g.runs) <= compared else None
             for g in groups]
    caption = describe_runs([cfg for _, cfg, _, _ in runs], groups)
    save(build_comparison(groups, reference.kind, published=marks, caption=caption), out_dir / stem, fmt)
    return text
