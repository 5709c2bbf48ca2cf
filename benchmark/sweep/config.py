"""Sweep files: one typed schema, expanded into named, validated run configs.

A sweep file holds a base run config (the protocol preset < `base_config:` file < `base:`
mapping, laid over each other exactly as `cfbench run`'s layers are) and axes. The cartesian
product of the axes gives one run per combination, each a complete `RunConfig` with one
strategy and one seed, named from its axis values (`ldifs-alpha10-s0`) so that the same sweep
file always gives the same names and a second invocation finds the runs of the first.

    name: example                 # the sweep folder, <out>/<name>/ (default: the file's stem)
    protocol: demo
    base_config: base.yaml        # optional, relative to the sweep file
    base: {train: {epochs: 1}}    # optional
    axes:
      strategies: [ft, ldifs]
      seeds: [0, 1, 2]
      sequences: [demo, [digits, faces]]     # named sequences or task lists
      models: [efficientnet_lite0]           # a model name or a `model:` mapping
      strategy_params.ldifs.alpha: [1, 10]   # applies to the runs whose strategy has ldifs
      train.lr: [1.0e-3, 1.0e-4]             # any other setting, by its dotted path
    max_parallel: null            # runs at a time (null: one per GPU, or one per node without GPUs)
    max_retries: 2                # a failed run is resumed from its checkpoint this many times
    resources: {num_cpus: null, num_gpus: null}   # per run (null: all CPUs / max_parallel; 1 GPU if any;
                                                  # N >= 2 whole GPUs: the run trains DDP over them)

Every problem is one `CfbenchError` line naming the file; nothing here writes anything.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import strategies

from ..config import RunConfig, read_config_file, resolve
from ..config.loading import preset_tree
from ..config.overrides import setting_parts
from ..config.schema import _build, merge, rebuild
from ..config.validate import check_run, check_writable_folder
from ..errors import CfbenchError

SPECIAL_AXES = ("strategies", "seeds", "sequences", "models")
# settings an axis may not vary: set elsewhere in the sweep file, or by the sweep itself
NOT_AXES = {"protocol": "set `protocol:` at the top of the sweep file",
            "strategies": "use the `strategies` axis", "seed": "use the `seeds` axis",
            "sequence": "use the `sequences` axis", "tasks": "use the `sequences` axis",
            "model": "use the `models` axis or model.<key>", "out": "the sweep folder is <out>/<name>",
            "threads": "threads per run follow resources.num_cpus"}
MAX_RUNS = 10_000  # each run is checked up front and gets a folder; a typo in an axis should not hang the driver
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]*$")


@dataclass
class SweepResources:
    num_cpus: Optional[float] = field(default=None, metadata={"positive": True})  # null: all CPUs / max_parallel
    num_gpus: Optional[float] = field(default=None, metadata={"min": 0})  # null: 1 when the cluster has GPUs


@dataclass
class SweepConfig:
    name: Optional[str] = None               # sweep folder under out; null: the sweep file's stem
    protocol: Optional[str] = None
    base_config: Optional[str] = None        # a run config YAML (relative to the sweep file)
    base: dict[str, Any] = field(default_factory=dict)
    axes: dict[str, list[Any]] = field(default_factory=dict)
    max_parallel: Optional[int] = field(default=None, metadata={"positive": True})
    max_retries: int = field(default=2, metadata={"min": 0})
    resources: SweepResources = field(default_factory=SweepResources)


@dataclass
class PlannedRun:
    """One expanded run: its folder name, its complete config and the axis values that made it."""

    name: str
    strategy: str
    seed: int
    axes: dict[str, str]          # declared axis -> value label ("-" where the axis does not apply)
    config: RunConfig
    tasks: tuple[str, ...] = ()   # the trained tasks (progress: k of len(tasks))
    settings: dict = field(default_factory=dict, repr=False)  # config as the mapping it was built from


@dataclass
class SweepPlan:
    path: Path
    name: str
    folder: Path                  # absolute <out>/<name>
    spec: SweepConfig
    runs: list[PlannedRun]
    axis_names: list[str]         # declared axes other than strategies / seeds, in file order


def _fail(path: Path, message: str) -> CfbenchError:
    return CfbenchError(f"{path}: {message.removeprefix('config: ')}")


def read_sweep(path: Path) -> SweepConfig:
    """The typed sweep file (unknown keys, wrong types, out-of-range values: one line)."""
    if path.is_dir() or not path.exists():
        raise CfbenchError(f"sweep file {path} not found")
    data = read_config_file(str(path))
    try:
        spec = _build(SweepConfig, data)
    except CfbenchError as err:
        raise _fail(path, str(err)) from None
    for axis, values in spec.axes.items():
        if not values:
            raise _fail(path, f"axes.{axis} is empty; give at least one value")
    if spec.name is not None and (not _NAME.match(spec.name) or spec.name in (".", "..")):
        raise _fail(path, f"name {spec.name!r} must be a plain folder name (letters, digits, . _ + = -)")
    return spec


def _base_layers(path: Path, spec: SweepConfig) -> list[dict]:
    """protocol < base_config < base, with one protocol only."""
    layers = []
    if spec.base_config is not None:
        base_file = Path(spec.base_config).expanduser()
        base_file = base_file if base_file.is_absolute() else path.parent / base_file
        if not base_file.is_file():
            raise _fail(path, f"base_config {spec.base_config}: no such file (relative paths start at the sweep "
                              f"file's folder)")
        layers.append(read_config_file(str(base_file)))
    layers.append(spec.base)
    named = {layer["protocol"] for layer in layers if layer.get("protocol")}
    if spec.protocol is not None:
        named.add(spec.protocol)
    if len(named) > 1:
        raise _fail(path, f"two protocols named ({', '.join(sorted(named))}); name one")
    if spec.protocol is not None:
        layers.insert(0, {"protocol": spec.protocol})
    return layers


def _label(value: Any) -> str:
    """A short, file-name-safe label of an axis value (10.0 -> 10, 1e-05, a path -> its stem)."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float):
        text = format(value, "g")
    elif isinstance(value, (list, tuple)):
        text = "-".join(_label(v) for v in value)
        if len(text) > 48:
            text = f"{len(value)}x-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
    elif isinstance(value, dict):
        text = "-".join(_label(v) for v in value.values())
    elif value is None:
        text = "null"
    else:
        text = str(value)
        if "/" in text:
            text = Path(text).stem or text
    return re.sub(r"[^A-Za-z0-9._+=-]", "_", text)


def _setting_axis(path: Path, key: str) -> list[str]:
    """The dotted path of a settings axis, checked against the RunConfig schema."""
    parts = key.split(".")
    if parts[0] in NOT_AXES and (parts[0] != "model" or len(parts) == 1):
        raise _fail(path, f"axes.{key}: not an axis ({NOT_AXES[parts[0]]})")
    known = ", ".join(SPECIAL_AXES) + ", strategy_params.<strategy>.<parameter> or a setting's dotted path"
    try:
        return setting_parts(key, what="axis", known=f"axes are {known}")
    except CfbenchError as err:
        message = str(err)
        raise _fail(path, f"axes.{message}" if message.startswith(f"{key}:") else message) from None


def _components(strategy: str) -> set[str]:
    return {n.strip().lower() for n in strategy.split("+") if n.strip()}


def expand(path: Path, spec: SweepConfig, out: Optional[str] = None) -> SweepPlan:
    """The cartesian product of the axes as runs, every config complete and typed (not yet checked
    against the data and the machine: `check_plan` does that)."""
    layers = _base_layers(path, spec)
    if out is not None:
        layers.append({"out": out})
    try:
        base = resolve(*layers)
    except CfbenchError as err:
        raise _fail(path, f"base: {str(err).removeprefix('config: ')}") from None
    name = spec.name or path.stem
    if not _NAME.match(name):
        raise _fail(path, f"the sweep needs a plain folder name; set `name:` (the file's stem {name!r} is not one)")
    folder = (Path(base.out).expanduser() / name).absolute()
    axes = dict(spec.axes)
    strategies_axis = axes.pop("strategies", list(base.strategies))
    seeds_axis = axes.pop("seeds", [base.seed])
    for i, s in enumerate(strategies_axis):
        if not isinstance(s, str) or not s.strip():
            raise _fail(path, f"axes.strategies[{i}] must be a strategy name (ft, ldifs+ewc, ...), not {s!r}")
    for i, s in enumerate(seeds_axis):
        if not isinstance(s, int) or isinstance(s, bool):
            raise _fail(path, f"axes.seeds[{i}] must be an integer, not {s!r}")
    settings = {key: _setting_axis(path, key) for key in axes if key not in SPECIAL_AXES}
    used = set().union(*(_components(s) for s in strategies_axis))
    for key, parts in settings.items():
        if parts[0] == "strategy_params" and parts[1] not in used:
            raise _fail(path, f"axes.{key} applies to no run: no strategy of the sweep uses {parts[1]}")
    shorts = [parts[-1] for parts in settings.values()]
    axis_names = list(axes)
    count = math.prod(len(v) for v in axes.values()) * len(strategies_axis) * len(seeds_axis)
    if count > MAX_RUNS:
        raise _fail(path, f"the axes make {count:,} runs, more than the {MAX_RUNS:,} one sweep may hold; split it")
    for key, values in [("strategies", strategies_axis), ("seeds", seeds_axis), *axes.items()]:
        seen_values: set = set()
        for value in values:
            label = repr(value)
            if label in seen_values:
                raise _fail(path, f"axes.{key} lists {value!r} twice")
            seen_values.add(label)
    base_tree = base.to_dict()
    preset = preset_tree(base.protocol)  # `protocol` is never an axis (NOT_AXES)
    changed = {"strategies", "seed", "out", *(parts[0] for parts in settings.values()),
               *(("sequence", "tasks") if "sequences" in axes else ()), *(("model",) if "models" in axes else ())}
    seen: dict[str, dict] = {}
    unique = []
    for values in itertools.product(*axes.values()):
        for strategy in strategies_axis:
            for seed in seeds_axis:
                run_name, tree, labels = _run_tree(path, base_tree, preset, folder, dict(zip(axis_names, values)),
                                                   settings, shorts, strategy, seed)
                if run_name in seen:
                    if seen[run_name] != tree:
                        raise _fail(path, f"two different runs would both be named {run_name}; give their axis "
                                          "values distinct labels")
                    continue  # an axis that does not apply to this strategy: the same run once
                seen[run_name] = tree
                try:
                    cfg = rebuild(base, tree, changed)
                except CfbenchError as err:
                    raise _fail(path, f"run {run_name}: {str(err).removeprefix('config: ')}") from None
                unique.append(PlannedRun(run_name, strategy, seed, labels, cfg, settings=tree))
    return SweepPlan(path, name, folder, spec, unique, axis_names)


def _run_tree(path: Path, base_tree: dict, preset: dict, folder: Path, values: dict[str, Any],
              settings: dict[str, list[str]], shorts: list[str], strategy: str,
              seed: int) -> tuple[str, dict, dict[str, str]]:
    """(name, complete settings, axis labels) of one run of the grid: the base config (complete,
    resolved) with the run's axis values, laid as `resolve(tree)` would lay them -- each value over
    the preset at its place -- without copying and merging the whole tree 10,000 times."""
    tree = dict(base_tree)  # shallow: what an axis sets is copied along its path, never the base's
    tree.update(strategies=[strategy], seed=seed, out=str(folder))
    labels: dict[str, str] = {}
    parts_of_name = [strategy]
    for axis, value in values.items():
        if axis == "sequences":
            if isinstance(value, str):
                tree.update(sequence=value, tasks=None)
            elif isinstance(value, list) and value and all(isinstance(t, str) for t in value):
                tree["tasks"] = list(value)
            else:
                raise _fail(path, f"axes.sequences: each value is a sequence name or a list of task names, "
                                  f"not {value!r}")
            label = _label(value)
        elif axis == "models":
            if isinstance(value, str):
                tree["model"] = {**tree["model"], "name": value}
            elif isinstance(value, dict):
                tree["model"] = {**tree["model"], **value}
            else:
                raise _fail(path, f"axes.models: each value is a model name or a model mapping, not {value!r}")
            label = _label(value)
        else:
            parts = settings[axis]
            if parts[0] == "strategy_params" and parts[1] not in _components(strategy):
                labels[axis] = "-"
                continue
            _set_copied(tree, parts, value, preset)
            short = parts[-1] if shorts.count(parts[-1]) == 1 else "_".join(parts[1:] or parts)
            labels[axis] = _label(value)
            parts_of_name.append(f"{short}{labels[axis]}")
            continue
        labels[axis] = label
        parts_of_name.append(label)
    return re.sub(r"[^A-Za-z0-9._+=-]", "_", "-".join([*parts_of_name, f"s{seed}"])), tree, labels


def _set_copied(tree: dict, parts: list[str], value: Any, preset: dict) -> None:
    """set_path on a shallow copy of the base tree: the mappings along the path are copied first;
    a mapping value is laid over the preset's at that place, as resolve() would lay it."""
    node, under = tree, preset
    for part in parts[:-1]:
        node[part] = dict(node[part]) if isinstance(node.get(part), dict) else {}
        node = node[part]
        under = under.get(part) if isinstance(under, dict) else None
    old = under.get(parts[-1]) if isinstance(under, dict) else None
    node[parts[-1]] = merge(old, value) if isinstance(old, dict) and isinstance(value, dict) else copy.deepcopy(value)


def ranks_for(num_gpus: float) -> int:
    """A run that holds N >= 2 whole GPUs trains over N DDP processes (one per GPU), else in one."""
    return int(num_gpus) if num_gpus >= 2 and float(num_gpus).is_integer() else 1


def check_plan(plan: SweepPlan) -> None:
    """Every expanded config through `config.validate.check_run` (strategies and parameters,
    tasks and their data, model, output and cache folders) and, for runs holding N >= 2 GPUs, the
    strategies' data parallel over N processes: nothing starts unless all pass."""

    nproc = ranks_for(plan.spec.resources.num_gpus or 0)
    checked: dict[str, tuple[str, ...]] = {}  # runs that differ in their seed alone pass the same checks
    for run in plan.runs:
        try:
            key = json.dumps({**(run.settings or run.config.to_dict()), "seed": None}, sort_keys=True, default=str)
            if key not in checked:
                checked[key] = check_run(run.config).trained
                strategies.check_data_parallel(run.strategy, nproc)
            run.tasks = checked[key]
        except CfbenchError as err:
            raise CfbenchError(f"{plan.path}: run {run.name}: {err}") from None


def load_sweep(path: str, out: Optional[str] = None) -> SweepPlan:
    """Read, expand and check a sweep file; `out` (--out) replaces the base config's `out`."""

    p = Path(path)
    plan = expand(p, read_sweep(p), out)
    check_writable_folder(plan.folder, "--out")
    check_plan(plan)
    return plan
