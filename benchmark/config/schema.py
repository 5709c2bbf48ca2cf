"""The run configuration's one typed schema. A (merged) mapping becomes a `RunConfig`, whose fields
are checked against their type hints and range metadata: unknown keys, wrong types and
out-of-range values are one-line errors. `RunConfig.to_dict()` is what a run directory's
config.yaml holds; loading it again gives the same config (config/loading.py lays the layers)."""
from __future__ import annotations

import copy
import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import tasks

from ..errors import CfbenchError
from ..limits import INT_MAX, THREADS_MAX

DEFAULT_PROTOCOL = "demo"

# settings that describe the machine a run is on, not the experiment: a resumed run may change
# them, and runs that differ only in them (and the seed / output folder) are one experiment
MACHINE_SETTINGS = ("device", "threads", "data_root", "cache_dir")
ROW_SECTIONS = ("train", "eval", "strategy_params")  # what RunConfig.rows may set

# field metadata: {"min": x} / {"max": x} bounds (inclusive), {"positive": True} strictly > 0. Every
# number is also finite, and every integer fits a C int (INT_MAX): torch, numpy and the CUDA
# kernels take them as such
_POSITIVE = {"positive": True}


@dataclass
class AugmentConfig:
    """Training-time augmentation, applied on the device to each uint8 batch."""

    kind: Literal["none", "rrc"] = "none"   # rrc: torchvision RandomResizedCrop, bicubic, back to the input size
    scale: tuple[float, float] = (0.9, 1.0)       # crop area as a fraction of the image
    ratio: tuple[float, float] = (0.75, 4 / 3)    # crop aspect ratio range (torchvision's default)
    once: bool = False  # one view per training image, drawn as its task starts and reused at every step

    def check(self, where: str) -> None:
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise CfbenchError(f"config: {where}.scale must satisfy 0 < low <= high <= 1, not {list(self.scale)}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise CfbenchError(f"config: {where}.ratio must satisfy 0 < low <= high, not {list(self.ratio)}")


@dataclass
class ModelConfig:
    name: str = "efficientnet_lite0"            # efficientnet_lite0 or an open_clip model name
    pretrained: Optional[str] = "package"       # "package", an open_clip tag, or a checkpoint path
    image_size: Optional[int] = field(default=None, metadata={"min": 8, "max": 4096})  # null: the model's own
    freeze_bn: bool = True
    quick_gelu: Optional[bool] = None           # null: as the pretrained tag was trained (open_clip metadata)


@dataclass
class TrainConfig:
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = field(default=0.9, metadata={"min": 0, "max": 0.999})  # sgd only (DIKI: 0)
    lr: Union[float, dict[str, float]] = field(default=1e-3, metadata={"positive": True, "max": 100})  # or {task: lr, default: lr}
    weight_decay: float = field(default=0.1, metadata={"min": 0, "max": 100})
    batch_size: int = field(default=64, metadata={"positive": True, "max": 2 ** 20})
    epochs: Union[int, dict[str, int]] = field(default=3, metadata=_POSITIVE)  # or {task: epochs, default: n}
    iterations: Optional[int] = field(default=None, metadata=_POSITIVE)  # steps per task; wins over epochs
    schedule_steps: Optional[int] = field(default=None, metadata=_POSITIVE)  # cosine horizon; null: the task's steps
    split: Literal["train", "trainval"] = "train"  # trainval: no validation hold-out (ZSCL trains on all of train)
    max_train_per_class: Optional[int] = field(default=450, metadata=_POSITIVE)  # null: the whole split
    head: Literal["linear", "text"] = "linear"  # text: the trainable text tower's class-prompt embeddings (CLIP)
    label_smoothing: float = field(default=0.0, metadata={"min": 0})  # < 1 (check)
    head_init: Literal["lp", "zs", "zero"] = "lp"  # linear heads only
    warmup_steps: int = field(default=20, metadata={"min": 0})
    lr_floor: float = field(default=0.0, metadata={"min": 0, "max": 1})  # the cosine ends at lr * lr_floor (DIKI: 1e-3)
    grad_clip: Optional[float] = field(default=None, metadata=_POSITIVE)  # max global gradient norm
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False

    def epochs_for(self, task: str) -> int:
        return per_task(self.epochs, task, "train.epochs")

    def lr_for(self, task: str) -> float:
        return per_task(self.lr, task, "train.lr")


def per_task(value, task: str, where: str):
    """A setting given as one value or as {task: value, default: value}."""
    if not isinstance(value, dict):
        return value
    if task in value:
        return value[task]
    if "default" in value:
        return value["default"]
    raise CfbenchError(per_task_missing_message(where, [task]))


def per_task_missing_message(where: str, tasks: list[str]) -> str:
    """The line for a per-task map without a value for `tasks`, with both ways to fix it."""
    named = ", ".join(repr(t) for t in tasks)
    one, example = ("--epochs N", "3, default: 1") if where == "train.epochs" else (f"{where}=1e-5", "1e-5, default: 1e-5")
    return (f"config: {where} names no value for task{'s' if len(tasks) > 1 else ''} {named} and has no 'default'; "
            f"give every task one value ({one}) or add a default: {where}='{{{tasks[0]}: {example}}}'")


@dataclass
class WithinTaskConfig:
    """Evaluation at `points` evenly spaced steps inside every task, in process (forgetting as
    fine-tuning proceeds); 0 = off. kinds: zs (test features only), head, lp (fits a probe per point)."""

    points: int = field(default=0, metadata={"min": 0, "max": 100000})
    kinds: list[Literal["zs", "lp", "head"]] = field(default_factory=lambda: ["zs"])


@dataclass
class EvalConfig:
    probe: Literal["sklearn", "official"] = "sklearn"  # official: the LDIFS code's PyTorch logistic regression
    probe_max_per_class: Optional[int] = field(default=100, metadata=_POSITIVE)  # null: the whole split
    test_max_per_class: Optional[int] = field(default=None, metadata=_POSITIVE)
    probe_C: float = field(default=1.0, metadata={"positive": True, "max": 1e12})          # sklearn probe only
    probe_iterations: int = field(default=1000, metadata=_POSITIVE)  # official probe only (full-batch AdamW)
    batch_size: int = field(default=256, metadata={"positive": True, "max": 2 ** 20})
    zs_text: Literal["pretrained", "current"] = "current"  # whose text tower makes the zero-shot classifiers
    templates: Optional[str] = None  # null: clip-benchmark's; or a name in protocols/templates/, or a YAML path
    classnames: Optional[str] = None  # null: the tasks' curated names; or a name in protocols/classnames/, or a path
    within_task: WithinTaskConfig = field(default_factory=WithinTaskConfig)  # curves during fine-tuning


@dataclass
class RunConfig:
    protocol: str = DEFAULT_PROTOCOL
    sequence: str = "demo"                 # a named sequence (`cfbench list sequences`) ...
    tasks: Optional[list[str]] = None      # ... or an explicit list of trained tasks, which wins
    eval_only: Optional[list[str]] = None  # never-trained eval datasets; null = the sequence's own
    strategies: list[str] = field(default_factory=lambda: ["ft", "ldifs"])
    strategy_params: dict[str, dict[str, Any]] = field(default_factory=dict)  # {strategy: {param: value}}
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    data_root: Optional[str] = None        # null: $CFBENCH_DATA or ~/data
    cache_dir: Optional[str] = None        # null: $CFBENCH_CACHE or ~/.cache/cfbench
    # raw: uint8 squares (fastest reads, 150 KB per 224-px image); compact: source pixels / JPEG,
    # decoded per batch; auto: raw while the run's splits fit cache_budget_gb, else compact
    cache_format: Literal["auto", "raw", "compact"] = "auto"
    cache_budget_gb: float = field(default=16.0, metadata={"positive": True, "max": 1e6})  # up to a petabyte
    out: str = "results"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = field(default=0, metadata={"min": 0})
    threads: Optional[int] = field(default=None, metadata={"positive": True, "max": THREADS_MAX})  # null: every core
    # experiment trackers (benchmark/report/trackers.py): loss, penalties, lr per step; every eval round
    loggers: list[Literal["tensorboard", "wandb", "mlflow", "csv"]] = field(default_factory=list)
    # a run's heatmaps and curves, and its invocation's comparison figures, drawn when it finishes;
    # false: tables and CSVs only (`cfbench plot RUN`, `cfbench compare RUN...` draw them later)
    figures: bool = True
    # what a run keeps of checkpoints/state.pt once it has finished (until then it is always written,
    # for --resume): keep -- all of it (weights and the strategy's state); last -- the final weights
    # alone, as checkpoints/model.pt (a state dict); drop -- nothing
    checkpoints: Literal["keep", "last", "drop"] = "keep"
    # your own datasets: {name: folder holding train/<class>/ and test/<class>/ (val/ optional)};
    # each name is then a task for `tasks` / `eval_only` (tasks/folders.py)
    image_folders: dict[str, str] = field(default_factory=dict)
    # settings for one strategy's runs alone, laid over the rest: {strategy: {train: ..., eval: ...,
    # strategy_params: ...}} -- a protocol's rows whose official code trains differently (zscl-mtil's
    # moe-adapters); a run's config.yaml holds its row folded in (rows: {})
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(copy.deepcopy(self), **changes)

    def for_strategy(self, combo: str) -> "RunConfig":
        """The config of `combo`'s runs: its row laid over the rest, rows folded away."""
        row = self.rows.get(combo)
        if not row:
            return self.replace(rows={}) if self.rows else self
        return build_config(merge({**self.to_dict(), "rows": {}}, row))

    def check(self) -> None:
        if not self.strategies:
            raise CfbenchError("config: strategies must be a non-empty list")
        for combo, row in self.rows.items():
            if not isinstance(row, dict) or set(row) - set(ROW_SECTIONS):
                raise CfbenchError(f"config: rows.{combo} may set {', '.join(ROW_SECTIONS)} only (a row changes how "
                                   f"one strategy trains and is evaluated, not what)")
            self.for_strategy(combo)  # its settings' types and ranges, one line each
        for key in ("strategies", "tasks", "eval_only"):
            _refuse_repeats(getattr(self, key) or [], key)
        self.train.augment.check("train.augment")
        _refuse_repeats(self.eval.within_task.kinds, "eval.within_task.kinds")
        if self.eval.within_task.points and not self.eval.within_task.kinds:
            raise CfbenchError("config: eval.within_task.kinds must name at least one of zs, lp, head")
        if self.train.label_smoothing >= 1:
            raise CfbenchError(f"config: train.label_smoothing must be < 1, not {self.train.label_smoothing}")


def _refuse_repeats(items: list, key: str) -> None:
    """A name twice would train a whole run before failing, or write a matrix with a repeated column."""
    seen = set()
    for item in items:
        name = item.strip().lower() if isinstance(item, str) else item
        if name in seen:
            raise CfbenchError(f"config: {key} names {item!r} twice")
        seen.add(name)


def _plain(value):
    """Tuples become lists so that YAML stays plain."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ---- building a typed config from a mapping ------------------------------------------------

def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


@functools.lru_cache(maxsize=None)
def _hint(hint) -> tuple[Any, tuple, bool]:
    """(origin, args, is a dataclass) of a type hint, worked out once (a sweep coerces 770,000 values)."""
    return typing.get_origin(hint), typing.get_args(hint), dataclasses.is_dataclass(hint)


def _coerce(value, hint, where: str):
    """value converted to `hint` (int -> float is the only widening), or a CfbenchError."""
    origin, args, is_section = _hint(hint)
    if hint is Any:
        return value
    if is_section:
        if not isinstance(value, dict):
            raise CfbenchError(f"config: {where!r} must be a mapping")
        return _build(hint, value, where + ".")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, where)
            except CfbenchError:
                continue
        raise CfbenchError(f"config: {where} must be {' or '.join(_describe(a) for a in args)}, not {value!r}")
    if origin is Literal:
        if not any(value == a and type(value) is type(a) for a in args):
            raise CfbenchError(f"config: {where} must be one of {args}, not {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise CfbenchError(f"config: {where} must be a list, not {value!r}")
        if origin is tuple:
            if len(value) != len(args):
                raise CfbenchError(f"config: {where} must be a list of {len(args)} values, not {value!r}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise CfbenchError(f"config: {where!r} must be a mapping")
        return {_coerce(k, args[0], where): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise CfbenchError(f"config: {where} must be true or false, not {value!r}")
        return value
    if hint in (int, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if hint is int and ok and isinstance(value, float) and not value.is_integer():
            ok = False
        if not ok:
            raise CfbenchError(f"config: {where} must be {'an integer' if hint is int else 'a number'}, not {value!r}")
        if not math.isfinite(value):
            raise CfbenchError(f"config: {where} must be a finite number, not {value!r}")
        if hint is int and abs(value) > INT_MAX:
            raise CfbenchError(f"config: {where} must be at most {INT_MAX} in size, not {value!r}")
        return hint(value)
    if hint is str:
        if not isinstance(value, str):
            raise CfbenchError(f"config: {where} must be a string, not {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint!r} at {where}")  # a schema bug, not a user error


def _describe(hint) -> str:
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(hint, _type_name(hint))


def _check_range(value, meta: dict, where: str) -> None:
    numbers = value.values() if isinstance(value, dict) else [value]
    for v in numbers:
        if v is None or not isinstance(v, (int, float)):
            continue
        if meta.get("positive") and v <= 0:
            raise CfbenchError(f"config: {where} must be positive, not {v!r}")
        if "min" in meta and v < meta["min"]:
            raise CfbenchError(f"config: {where} must be >= {meta['min']}, not {v!r}")
        if "max" in meta and v > meta["max"]:
            raise CfbenchError(f"config: {where} must be <= {meta['max']:g}, not {v!r}")


@functools.lru_cache(maxsize=None)
def _fields(cls) -> tuple[dict[str, Any], dict[str, dataclasses.Field]]:
    """(type hints, fields) of a schema class, resolved once (a 10,000-run sweep builds 10,000)."""
    return typing.get_type_hints(cls), {f.name: f for f in dataclasses.fields(cls)}


def _build(cls, data: dict, prefix: str = ""):
    hints, fields = _fields(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise CfbenchError(f"config: unknown key {prefix + str(unknown[0])!r}; known: {', '.join(fields)}")
    values = {}
    for name, value in data.items():
        where = prefix + name
        values[name] = _coerce(value, hints[name], where)
        _check_range(values[name], fields[name].metadata, where)
    return cls(**values)


def _sections(cls=RunConfig) -> dict[str, Any]:
    """{field: nested sections} for the dataclass-typed fields of cls (the mappings to merge key by key)."""
    hints = typing.get_type_hints(cls)
    return {f.name: _sections(hints[f.name]) for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])}


def merge(base: dict, update: dict) -> dict:
    """update laid over base. A mapping merges key by key at every depth -- the sections, each
    strategy's parameters, the per-task maps of train.epochs / train.lr -- so a layer that names one
    value keeps the protocol's others; anything else (a number, a string, a list, null) replaces."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def missing_keys(data: dict, cls=RunConfig, prefix: str = "") -> list[str]:
    """The schema's keys (dotted, sections included) that `data` lacks."""
    hints = typing.get_type_hints(cls)
    missing = []
    for f in dataclasses.fields(cls):
        if f.name not in data:
            missing.append(prefix + f.name)
        elif dataclasses.is_dataclass(hints[f.name]) and isinstance(data[f.name], dict):
            missing += missing_keys(data[f.name], hints[f.name], f"{prefix}{f.name}.")
    return missing


def rebuild(base: RunConfig, data: dict, changed: set[str]) -> RunConfig:
    """build_config(data) for a `data` equal to base.to_dict() but at the top-level keys `changed`:
    those alone are checked and built again, the other sections are base's own (a sweep's 10,000
    runs share them; a run's config is copied before anything changes it)."""
    hints, fields = _fields(RunConfig)
    if not changed <= set(fields):
        return build_config(data)
    values = {name: getattr(base, name) for name in fields}
    for name in changed:
        values[name] = _coerce(data[name], hints[name], name)
        _check_range(values[name], fields[name].metadata, name)
    cfg = RunConfig(**values)
    cfg.check()
    tasks.register_image_folders(cfg.image_folders)
    return cfg


def build_config(data: dict) -> RunConfig:
    """A complete mapping as a checked RunConfig (unknown keys, types, ranges: one-line errors)."""
    cfg = _build(RunConfig, data)
    cfg.check()
    tasks.register_image_folders(cfg.image_folders)  # before anything looks its tasks up, in every process
    return cfg
