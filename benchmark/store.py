"""Accuracy matrices in the SPEC §3 CSV format and atomic file writes."""
from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from .errors import CfbenchError

PRETRAINED = "pretrained"


def atomic_write_bytes(path: Union[str, Path], data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Union[str, Path], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def finite_or_null(obj: Any) -> Any:
    """obj with every NaN / ±inf float replaced by None: strict JSON (RFC 8259 has no Infinity)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_null(v) for v in obj]
    return obj


def strict_json(obj: Any, **kwargs) -> str:
    return json.dumps(finite_or_null(obj), allow_nan=False, **kwargs)


def atomic_write_json(path: Union[str, Path], obj: Any) -> None:
    atomic_write_text(path, strict_json(obj, indent=2, sort_keys=False) + "\n")


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
        rows = [r for r in csv.reader(io.StringIO(text)) if any(cell.strip() for cell in r)]
        if not rows:
            raise CfbenchError(f"{source}: empty file")
        header = [h.strip() for h in rows[0]]
        if len(header) < 2:
            raise CfbenchError(f"{source}: header needs a row-label column and at least one dataset column")
        matrix = cls(columns=header[1:])
        for lineno, row in enumerate(rows[1:], start=2):
            if len(row) != len(header):
                raise CfbenchError(f"{source}: line {lineno} has {len(row)} cells, the header has {len(header)}")
            cells = []
            for cell in row[1:]:
                cell = cell.strip()
                try:
                    cells.append(float(cell) if cell else math.nan)
                except ValueError:
                    raise CfbenchError(f"{source}: line {lineno}: {cell!r} is not a number") from None
            matrix.rows.append(row[0].strip())
            matrix.values.append(cells)
        return matrix

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Matrix":
        path = Path(path)
        if not path.is_file():
            raise CfbenchError(f"{path}: no such file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise CfbenchError(f"{path}: not a UTF-8 text file (a matrix is a CSV file)") from None
        return cls.from_csv_text(text, source=str(path))
