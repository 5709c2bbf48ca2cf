"""How a run differs from its protocol, so that an off-protocol number never passes for a protocol one.

A run's settings are compared with its protocol preset's (schema defaults < protocol file) setting by
setting, after both are made effective: the tasks actually trained and evaluated (a named sequence
resolved), each per-task map (`train.epochs`, `train.lr`) read for the trained tasks, and each run
strategy's parameters with their defaults filled in. Settings that describe the machine or the
bookkeeping, not the experiment, are left out: MACHINE_SETTINGS, the cache's format and budget, `out`,
`loggers` and `seed` (runs differing only in their seed are replicates of one experiment),
`eval.within_task` (curves beside the matrices, which change nothing the run trains or reports), and
the strategy parameters that size resources (`StrategySpec.machine`). A value the protocol needs but cannot
ship (its file's `supplied:` section, e.g. ZSCL's captions file) follows the protocol when given and
is a change when left null.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

import strategies

from ..errors import CfbenchError
from ..models import default_image_size
from .loading import resolve
from .plan import make_plan
from .protocols import protocol_supplied
from .schema import MACHINE_SETTINGS, RunConfig, per_task

NOT_COMPARED = (*MACHINE_SETTINGS, "cache_format", "cache_budget_gb", "out", "loggers", "figures", "checkpoints", "seed",
                "protocol", "strategies", "sequence",  # sequence: compared as the tasks it resolves to
                "rows")  # compared as the settings they give each strategy's runs
PER_TASK = ("epochs", "lr")  # train settings given as one value or {task: value, default: value}
_MISSING = object()


@dataclass(frozen=True)
class Deviation:
    key: str        # dotted path, e.g. train.epochs.cars or strategy_params.ldifs.alpha
    protocol: Any   # None where the protocol has no value (a per-task map without the task)
    run: Any

    def describe(self) -> str:
        return f"{self.key} {_short(self.protocol)} → {_short(self.run)}"

    def to_dict(self) -> dict:
        return {"key": self.key, "protocol": self.protocol, "run": self.run}


def protocol_deviations(cfg: RunConfig, combos: Optional[Sequence[str]] = None) -> list[Deviation]:
    """Every setting of `cfg` (for the strategy combinations `combos`, default cfg.strategies) that is
    not its protocol's, in schema order."""
    combos = list(combos or cfg.strategies)
    preset = resolve({"protocol": cfg.protocol, "data_root": cfg.data_root})
    if len(combos) > 1 and (cfg.rows or preset.rows):  # rows: what differs for some strategies is named so
        each = {combo: protocol_deviations(cfg, [combo]) for combo in combos}
        common = [d for d in each[combos[0]] if all(d in found for found in each.values())]
        return common + [replace(d, key=f"{combo}: {d.key}") for combo, found in each.items()
                         for d in found if d not in common]
    if len(combos) == 1:  # one strategy's runs: its row of the protocol against its row of the config
        preset, cfg = preset.for_strategy(combos[0]), cfg.for_strategy(combos[0])
    protocol, run = _effective(preset, combos), _effective(cfg, combos)
    trained = tuple(run["tasks"] or ())
    for key in PER_TASK:  # a map on either side: compared task by task, for the tasks this run trains
        if isinstance(protocol["train"][key], dict) or isinstance(run["train"][key], dict):
            protocol["train"][key], run["train"][key] = (_per_task(side["train"][key], trained)
                                                         for side in (protocol, run))
    for key, what in protocol_supplied(cfg.protocol).items():  # the protocol's value is "a file the user gives"
        *parents, leaf = key.split(".")
        node_p, node_r = protocol, run
        for part in parents:
            node_p, node_r = node_p.get(part, {}), node_r.get(part, {})
        if leaf in node_p:
            node_p[leaf] = node_r.get(leaf) if node_r.get(leaf) is not None else f"<{what}>"
    return _differences(protocol, run)


def summary(cfg: RunConfig, found: list[Deviation]) -> str:
    """`protocol ldifs, 2 changes: train.epochs.cars 35 → 5, strategy_params.ldifs.alpha 10 → 100`."""
    return headline(cfg, found) + "".join((": " if i == 0 else ", ") + d.describe() for i, d in enumerate(found))


def headline(cfg: RunConfig, found: list[Deviation]) -> str:
    return f"protocol {cfg.protocol}, " + (count_label(len(found)) if found else "no changes")


def count_label(n: int) -> str:
    return f"{n} change" + ("" if n == 1 else "s")


def _effective(cfg: RunConfig, combos: list[str]) -> dict:
    """The settings that define the experiment, as values comparable key by key."""
    data = {k: v for k, v in cfg.to_dict().items() if k not in NOT_COMPARED}
    data["model"]["image_size"] = cfg.model.image_size or default_image_size(cfg.model.name)  # null: the model's own
    # extra evaluation points: the run trains the same weights and fills the same matrices with or without
    data["eval"].pop("within_task", None)
    try:
        plan = make_plan(cfg)
        data["tasks"], data["eval_only"] = list(plan.trained), list(plan.eval_only)
    except CfbenchError:  # the protocol's sequence may need data this machine lacks
        data["tasks"], data["eval_only"] = cfg.tasks, cfg.eval_only
    params: dict = {}
    for combo in combos:
        for name, values in strategies.resolve_params(combo, cfg.strategy_params).items():
            machine = strategies.STRATEGIES[name].machine
            params[name] = {k: v for k, v in values.items() if k not in machine}
    data["strategy_params"] = params
    return data


def _per_task(value: Any, trained: tuple[str, ...]) -> dict:
    """{task: the value it trains with} by the config's own rule; None where the map names none."""
    out = {}
    for task in trained:
        try:
            out[task] = per_task(value, task, "")
        except CfbenchError:
            out[task] = None
    return out


def _differences(protocol: Any, run: Any, prefix: str = "") -> list[Deviation]:
    if isinstance(protocol, dict) and isinstance(run, dict):
        out = []
        for key in [*protocol, *(k for k in run if k not in protocol)]:
            out += _differences(protocol.get(key, _MISSING), run.get(key, _MISSING), f"{prefix}{key}.")
        return out
    if _same(protocol, run):
        return []
    undefined = lambda v: None if v is _MISSING else v  # noqa: E731
    return [Deviation(prefix.rstrip("."), undefined(protocol), undefined(run))]


def _same(a: Any, b: Any) -> bool:
    """Equal and of one kind (an int and a float of one value are one number; true is not 1)."""
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    return a == b and (type(a) is type(b) or (number(a) and number(b)))


def _short(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in value.items()) + "}"
    return str(value)
