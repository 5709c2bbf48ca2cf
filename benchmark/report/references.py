"""Published numbers as data: benchmark/references/NAME.yaml holds one paper table (its source in
the official code, the cfbench protocol, sequence and matrix kind it belongs to, and per method the
cfbench strategy that reproduces it with Transfer / Avg / Last per dataset and their means); read
strictly here. A reference is named, never given as a path."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import CfbenchError
from ..files import read_yaml_mapping

REFERENCE_DIR = Path(__file__).parent.parent / "references"
REFERENCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
METRICS = ("transfer", "avg", "last")  # cfbench's metric keys (benchmark/evaluation/metrics.py)
ACCURACY_KINDS = ("zs", "lp", "head")  # matrix kinds whose cells are accuracies
_TOP = {"name", "paper", "table", "source", "protocol", "sequence", "kind", "definitions", "column_order",
        "checked", "datasets", "rows", "matrix"}
_ROW = {"method", "strategy", "pretrained", "cell", "note", *METRICS}


@dataclass(frozen=True)
class Published:
    """One metric of one method: the paper's mean and its per-dataset values (None: not defined,
    e.g. Transfer of the first dataset)."""

    mean: float
    datasets: tuple[Optional[float], ...]


@dataclass(frozen=True)
class PublishedRow:
    method: str                 # as the paper names it
    strategy: Optional[str]     # the cfbench strategy that reproduces it; None where cfbench has none
    pretrained: bool            # the pretrained model's row (zero-shot): runs' pretrained rows are set beside it
    cell: str                   # where in the source this row is printed
    note: str
    metrics: dict[str, Published]  # transfer, avg, last


@dataclass(frozen=True)
class Reference:
    name: str
    paper: str
    table: str
    source: dict[str, str]
    protocol: str
    sequence: str
    kind: str                   # the cfbench matrix kind the numbers come from (zs, lp, head)
    datasets: tuple[str, ...]   # cfbench task names, in the sequence's training order
    checked: str
    rows: tuple[PublishedRow, ...]
    # the source's accuracy matrix (row t: after task t, columns: `datasets`) where the metrics were
    # computed from it here; None where the source prints the metrics themselves
    matrix: Optional[tuple[tuple[float, ...], ...]] = None

    def row_for(self, strategy: str) -> Optional[PublishedRow]:
        """The published row a cfbench strategy reproduces, or None."""
        return next((row for row in self.rows if row.strategy == strategy), None)

    @property
    def zero_shot(self) -> Optional[PublishedRow]:
        """The pretrained model's row (`pretrained: true`), if the table has one."""
        return next((row for row in self.rows if row.pretrained), None)


def _number(value, where: str, allow_none: bool = False) -> Optional[float]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 <= value <= 100:
        raise CfbenchError(f"{where}: expected an accuracy in [0, 100]{' or null' if allow_none else ''}, "
                           f"not {value!r}")
    return float(value)


def _text(data: dict, key: str, where: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value.strip():
        raise CfbenchError(f"{where}: `{key}` must be a non-empty text")
    return value.strip()


def _unknown(data: dict, allowed: set, where: str) -> None:
    extra = sorted(str(k) for k in data if k not in allowed)
    if extra:
        raise CfbenchError(f"{where}: unknown key(s) {', '.join(extra)}; allowed: {', '.join(sorted(allowed))}")


def _row(data, n: int, where: str) -> PublishedRow:
    if not isinstance(data, dict):
        raise CfbenchError(f"{where}: each row must be a mapping")
    _unknown(data, _ROW, where)
    strategy = data.get("strategy")
    if strategy is not None and (not isinstance(strategy, str) or not strategy):
        raise CfbenchError(f"{where}: `strategy` must be a cfbench strategy name or null")
    pretrained = data.get("pretrained", False)
    if not isinstance(pretrained, bool) or (pretrained and strategy is not None):
        raise CfbenchError(f"{where}: `pretrained` must be true or false, and a pretrained row has no strategy")
    metrics = {}
    for key in METRICS:
        value = data.get(key)
        if not isinstance(value, dict) or set(value) != {"mean", "datasets"} or not isinstance(value["datasets"], list):
            raise CfbenchError(f"{where}: `{key}` must be {{mean: N, datasets: [one value or null per dataset]}}")
        if len(value["datasets"]) != n:
            raise CfbenchError(f"{where}: `{key}` has {len(value['datasets'])} dataset values for {n} datasets")
        metrics[key] = Published(_number(value["mean"], f"{where}, {key} mean"),
                                 tuple(_number(v, f"{where}, {key}", allow_none=True) for v in value["datasets"]))
    return PublishedRow(_text(data, "method", where), strategy, pretrained, str(data.get("cell") or ""),
                        str(data.get("note") or "").strip(), metrics)


def parse_reference(data: dict, where: str) -> Reference:
    """A reference from its file's mapping; every key checked (a typo is an error, not a default)."""
    _unknown(data, _TOP, where)
    kind = _text(data, "kind", where)
    if kind not in ACCURACY_KINDS:
        raise CfbenchError(f"{where}: `kind` must be one of {', '.join(ACCURACY_KINDS)}, not {kind!r}")
    datasets = data.get("datasets")
    if not isinstance(datasets, list) or not datasets or not all(isinstance(d, str) and d for d in datasets) \
            or len(set(datasets)) != len(datasets):
        raise CfbenchError(f"{where}: `datasets` must be a list of distinct cfbench task names")
    source = data.get("source")
    if not isinstance(source, dict) or not {"repository", "commit", "file"} <= set(source):
        raise CfbenchError(f"{where}: `source` must name the repository, commit and file")
    rows = data.get("rows")
    if not isinstance(rows, list) or not rows:
        raise CfbenchError(f"{where}: `rows` must be a non-empty list")
    parsed = tuple(_row(r, len(datasets), f"{where}, row {i + 1}") for i, r in enumerate(rows))
    strategies = [r.strategy for r in parsed if r.strategy is not None]
    if len(set(strategies)) != len(strategies) or sum(r.pretrained for r in parsed) > 1:
        raise CfbenchError(f"{where}: a strategy (or the pretrained model) maps to more than one row")
    matrix = data.get("matrix")
    if matrix is not None:
        if not isinstance(matrix, list) or not matrix or len(matrix) > len(datasets) or \
                not all(isinstance(r, list) and len(r) == len(datasets) for r in matrix):
            raise CfbenchError(f"{where}: `matrix` must be a list of rows (one per trained task) of {len(datasets)} "
                               "accuracies")
        matrix = tuple(tuple(_number(v, f"{where}, matrix") for v in r) for r in matrix)
    return Reference(_text(data, "name", where), _text(data, "paper", where), _text(data, "table", where),
                     {str(k): str(v).strip() for k, v in source.items()}, _text(data, "protocol", where),
                     _text(data, "sequence", where), kind, tuple(datasets), _text(data, "checked", where), parsed,
                     matrix)


# strategies whose official repositories publish no numbers to check against: `cfbench list references`
# says so instead of a table typed in from a paper
UNPUBLISHED = {
    "ldifs": "omegafragger/ldifs_code (c7e82a4): a README of commands, no result files",
    "diki": "lloongx/DIKI (8ef89e7): code, three configs and a plot (docs/intro.png); its README links "
            "checkpoints on Google Drive, no accuracy matrix or log",
    "lora": "no official continual-learning code: LoRA (Hu et al. 2022) is a parameter-efficient layer, not a "
            "published MTIL row",
}


def list_references() -> list[str]:
    """The names of the shipped references (benchmark/references/*.yaml)."""
    return sorted(p.stem for p in REFERENCE_DIR.glob("*.yaml"))


def load_reference(name: str) -> Reference:
    """The reference NAME; a clear error for an unknown name (listing the known ones) or a malformed file."""
    known = isinstance(name, str) and REFERENCE_NAME.fullmatch(name) and (REFERENCE_DIR / f"{name}.yaml").is_file()
    if not known:
        raise CfbenchError(f"unknown reference {str(name)[:80]!r}; known: {', '.join(list_references()) or 'none'} "
                           "(cfbench list references)")
    path = REFERENCE_DIR / f"{name}.yaml"
    reference = parse_reference(read_yaml_mapping(path, "reference file"), str(path))
    if reference.name != name:
        raise CfbenchError(f"{path}: `name` is {reference.name!r}, not the file's name {name!r}")
    return reference
