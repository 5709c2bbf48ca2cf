"""Forgetting metrics of any accuracy matrix: README "Metrics" gives each formula."""
from __future__ import annotations

import warnings
from typing import Optional

import numpy as np

from ..errors import CfbenchError
from .matrix import PRETRAINED, Matrix

METRIC_KEYS = ("avg", "last", "transfer", "bwt", "forgetting", "delta_untrained", "delta_all")


def _mean(values) -> Optional[float]:
    arr = np.asarray(values, dtype=float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        m = np.nanmean(arr) if arr.size else np.nan
    return None if np.isnan(m) else float(m)


def split_matrix(matrix: Matrix) -> tuple[np.ndarray, Optional[np.ndarray], list[str], list[str]]:
    """Returns (A, P, trained columns, other columns).

    Trained columns are the row labels when every one names a column (cfbench's own format);
    otherwise, for published matrices, the first T columns in order.
    """
    values = matrix.array()
    P = values[0] if matrix.has_pretrained else None
    rows = matrix.rows[1:] if matrix.has_pretrained else matrix.rows
    body = values[1:] if matrix.has_pretrained else values
    T = len(rows)
    if T < 1:
        raise CfbenchError("need at least one trained-task row")
    if PRETRAINED in rows:
        raise CfbenchError("a 'pretrained' row is only allowed as the first row")
    if all(r in matrix.columns for r in rows):
        trained = list(rows)
    elif len(matrix.columns) >= T:
        trained = matrix.columns[:T]
    else:
        raise CfbenchError(f"{T} task rows but only {len(matrix.columns)} columns")
    cols = [matrix.columns.index(c) for c in trained]
    others = [c for c in matrix.columns if c not in trained]
    return body[:, cols], P, trained, others


def compute_metrics(matrix: Matrix) -> dict[str, Optional[float]]:
    A, P, trained, others = split_matrix(matrix)
    T = A.shape[0]
    out: dict[str, Optional[float]] = {
        "avg": _mean(A),
        "last": _mean(A[T - 1]),
        "transfer": _mean([_mean(A[:j, j]) if _mean(A[:j, j]) is not None else np.nan for j in range(1, T)]),
        "bwt": _mean([A[T - 1, j] - A[j, j] for j in range(T - 1)]),
        "forgetting": _mean([np.nanmax(A[:T - 1, j]) - A[T - 1, j] if not np.all(np.isnan(A[:T - 1, j]))
                             else np.nan for j in range(T - 1)]),
    }
    if P is not None:
        last = matrix.array()[-1]
        delta = last - P
        other_idx = [matrix.columns.index(c) for c in others]
        out["delta_untrained"] = _mean(delta[other_idx]) if other_idx else None
        out["delta_all"] = _mean(delta)
    return out


def metrics_table(metrics: dict[str, Optional[float]]) -> str:
    lines = [f"{'metric':<16} {'value':>9}"]
    for key in METRIC_KEYS:
        if key in metrics:
            v = metrics[key]
            lines.append(f"{key:<16} {'n/a' if v is None else f'{v:9.2f}':>9}")
    return "\n".join(lines)
