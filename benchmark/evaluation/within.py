"""Accuracy as fine-tuning proceeds: `matrices/within_<kind>.csv`, one row per evaluation point
(the task being trained, the step within it, the global step), one column per eval dataset. The
first row is the pretrained model (task `pretrained`, steps 0). Written atomically, read strictly."""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from ..errors import CfbenchError
from ..files import atomic_write_text, read_text
from .matrix import MATRIX_BYTES, PRETRAINED, _accuracy, _labels

HEADER = ("task", "step", "global_step")
PREFIX = "within_"  # matrices/within_<kind>.csv beside the matrices/<kind>.csv


def matrix_files(folder: Path) -> list[Path]:
    """A run's accuracy matrices (matrices/<kind>.csv), without its within-task curves."""
    return [p for p in sorted(folder.glob("*.csv")) if not p.name.startswith(PREFIX)]


def curve_files(folder: Path) -> dict[str, Path]:
    """{kind: path} of a run's within-task curves."""
    return {p.stem[len(PREFIX):]: p for p in sorted(folder.glob(f"{PREFIX}*.csv"))}


def within_points(steps: int, points: int) -> list[int]:
    """`points` evenly spaced steps in 1..steps (1-based, after that step's update), the last the
    task's final step; fewer when the task has fewer steps than points."""
    return sorted({max(1, math.ceil(k * steps / points)) for k in range(1, points + 1)}) if steps > 0 else []


@dataclass
class Curve:
    columns: list[str]
    points: list[tuple[str, int, int]] = field(default_factory=list)  # (task, step in task, global step)
    values: list[list[float]] = field(default_factory=list)

    def add(self, task: str, step: int, global_step: int, cells: dict[str, Optional[float]]) -> None:
        self.points.append((task, int(step), int(global_step)))
        self.values.append([math.nan if cells.get(c) is None else float(cells[c]) for c in self.columns])

    @property
    def last_global_step(self) -> int:
        return self.points[-1][2] if self.points else 0

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow([*HEADER, *self.columns])
        for (task, step, global_step), row in zip(self.points, self.values):
            writer.writerow([task, step, global_step, *("" if math.isnan(v) else f"{v:.4f}" for v in row)])
        return buf.getvalue()

    def save(self, path: Union[str, Path]) -> None:
        atomic_write_text(path, self.to_csv())

    def to_state(self) -> dict[str, Any]:
        """Plain lists for a checkpoint (torch.load(weights_only=True) reads them back)."""
        return {"columns": list(self.columns), "points": [list(p) for p in self.points],
                "values": [list(r) for r in self.values]}

    @classmethod
    def from_state(cls, state: Any, columns: list[str], tasks: list[str], where: str) -> "Curve":
        """A checkpoint's curve, checked: this run's columns, points of its finished tasks in order."""
        if not (isinstance(state, dict) and state.get("columns") == columns
                and isinstance(state.get("points"), list) and isinstance(state.get("values"), list)
                and len(state["points"]) == len(state["values"])):
            raise CfbenchError(f"{where}: not a within-task curve of this run's datasets")
        curve = cls(list(columns))
        for point, row in zip(state["points"], state["values"]):
            if not (isinstance(point, list) and len(point) == 3 and point[0] in (PRETRAINED, *tasks)
                    and all(type(v) is int and 0 <= v for v in point[1:])):
                raise CfbenchError(f"{where}: point {str(point)[:80]} is not (task, step, global step)")
            if not (isinstance(row, list) and len(row) == len(columns)
                    and all(isinstance(v, float) and (math.isnan(v) or 0 <= v <= 100) for v in row)):
                raise CfbenchError(f"{where}: values at {point} are not accuracies of the run's datasets")
            curve.points.append(tuple(point))
            curve.values.append(row)
        return curve

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Curve":
        source = str(path)
        text = read_text(Path(path), "within-task curve", MATRIX_BYTES)
        try:
            rows = [r for r in csv.reader(io.StringIO(text)) if any(cell.strip() for cell in r)]
        except csv.Error as err:
            raise CfbenchError(f"{source}: not a readable CSV file ({err})") from None
        if not rows or tuple(h.strip() for h in rows[0][:3]) != HEADER or len(rows[0]) < 4:
            raise CfbenchError(f"{source}: the header must be {', '.join(HEADER)}, then the datasets")
        curve = cls(_labels([h.strip() for h in rows[0][3:]], source, "column"))
        for lineno, row in enumerate(rows[1:], start=2):
            if len(row) != len(rows[0]):
                raise CfbenchError(f"{source}: line {lineno} has {len(row)} cells, the header has {len(rows[0])}")
            try:
                step, global_step = int(row[1]), int(row[2])
            except ValueError:
                raise CfbenchError(f"{source}: line {lineno}: steps must be whole numbers") from None
            if step < 0 or global_step < 0:
                raise CfbenchError(f"{source}: line {lineno}: steps must not be negative")
            curve.points.append((_labels([row[0].strip()], source, "task")[0], step, global_step))
            curve.values.append([_accuracy(cell.strip(), source, lineno) for cell in row[3:]])
        return curve
