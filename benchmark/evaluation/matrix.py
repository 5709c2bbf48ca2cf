"""Accuracy matrices: rows after each task, columns the evaluated datasets, in the CSV format of README "Run directory"
(written atomically, read strictly)."""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np

from ..errors import CfbenchError
from ..files import atomic_write_text, read_text

PRETRAINED = "pretrained"


@dataclass
class Matrix:
    """Rows: `pretrained` (optional) then one per trained task; columns: eval datasets; NaN = blank."""

    rows: list[str] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    values: list[list[float]] = field(default_factory=list)

    def add_row(self, label: str, cells: dict[str, Optional[float]]) -> None:
        self.rows.append(label)
        self.values.append([math.nan if cells.get(c) is None else float(cells[c]) for c in self.columns])

    def array(self) -> np.ndarray:
        return np.array(self.values, dtype=float).reshape(len(self.rows), len(self.columns))

    @property
    def has_pretrained(self) -> bool:
        return bool(self.rows) and self.rows[0] == PRETRAINED

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["after", *self.columns])
        for label, row in zip(self.rows, self.values):
            writer.writerow([label, *("" if math.isnan(v) else f"{v:.4f}" for v in row)])
        return buf.getvalue()

    def save(self, path: Union[str, Path]) -> None:
        atomic_write_text(path, self.to_csv())

    @classmethod
    def from_csv_text(cls, text: str, source: str = "matrix") -> "Matrix":
        """Strict: unique printable labels, every cell blank (or `nan`) or an accuracy in [0, 100]."""
        try:
            rows = [r for r in csv.reader(io.StringIO(text)) if any(cell.strip() for cell in r)]
        except csv.Error as err:
            raise CfbenchError(f"{source}: not a readable CSV file ({err})") from None
        if not rows:
            raise CfbenchError(f"{source}: empty file")
        header = [h.strip() for h in rows[0]]
        if len(header) < 2:
            raise CfbenchError(f"{source}: header needs a row-label column and at least one dataset column")
        matrix = cls(columns=_labels(header[1:], source, "column"))
        for lineno, row in enumerate(rows[1:], start=2):
            if len(row) != len(header):
                raise CfbenchError(f"{source}: line {lineno} has {len(row)} cells, the header has {len(header)}")
            matrix.rows.append(row[0].strip())
            matrix.values.append([_accuracy(cell.strip(), source, lineno) for cell in row[1:]])
        _labels(matrix.rows, source, "row")
        return matrix

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Matrix":
        return cls.from_csv_text(read_text(Path(path), "matrix file", MATRIX_BYTES), source=str(path))


MATRIX_BYTES = 16 * 1024 ** 2  # a 1,000 x 1,000 matrix is under 10 MB
LABEL_CHARS = 200


def _labels(labels: list[str], source: str, what: str) -> list[str]:
    """Dataset / task labels: non-empty, printable, at most LABEL_CHARS, each once."""
    seen = set()
    for label in labels:
        if not label or not label.isprintable() or len(label) > LABEL_CHARS:
            raise CfbenchError(f"{source}: {what} label {label[:40]!r} must be 1-{LABEL_CHARS} printable characters")
        if label in seen:
            raise CfbenchError(f"{source}: {what} label {label!r} appears twice")
        seen.add(label)
    return labels


def _accuracy(cell: str, source: str, lineno: int) -> float:
    if not cell or cell.lower() == "nan":  # numpy's savetxt writes a missing value as nan
        return math.nan
    try:
        value = float(cell)
    except ValueError:
        raise CfbenchError(f"{source}: line {lineno}: {cell[:40]!r} is not a number") from None
    if not 0 <= value <= 100:  # also false for NaN
        raise CfbenchError(f"{source}: line {lineno}: {cell[:40]!r} is not an accuracy in [0, 100] (leave a cell "
                           "blank for no value)")
    return value
