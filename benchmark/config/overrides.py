"""Settings by their dotted path -- `cfbench run train.lr=1e-4 strategy_params.ldifs.alpha=100` and a
sweep's axes -- checked against the schema, the value typed as YAML (`1e-4` a number, `[a, b]` a
list, `{mnist: 3, default: 1}` a per-task map, `null`), then laid over the config as its last layer."""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Sequence

import strategies

from ..errors import CfbenchError
from ..files import parse_yaml
from .schema import ROW_SECTIONS, RunConfig, _sections

MAX_OVERRIDE_CHARS = 10_000


def setting_parts(key: str, what: str = "setting", known: str = "") -> list[str]:
    """The parts of a dotted path that names one setting of RunConfig (or one strategy parameter:
    strategy_params.<strategy>.<parameter>); one line naming the first wrong part otherwise."""
    parts = key.split(".")
    if parts[0] == "rows":  # rows.<strategy>.<setting of a row section>
        if len(parts) < 4 or parts[2] not in ROW_SECTIONS:
            raise CfbenchError(f"{key}: name one setting of a strategy's row, rows.<strategy>.<"
                               f"{'|'.join(ROW_SECTIONS)}>.<setting>")
        strategies.parse_strategy(parts[1])
        return parts[:2] + setting_parts(".".join(parts[2:]), what, known)
    if parts[0] == "strategy_params":
        if len(parts) != 3:
            raise CfbenchError(f"{key}: name one parameter, strategy_params.<strategy>.<parameter>")
        spec = strategies.STRATEGIES.get(parts[1])
        if spec is None:
            raise CfbenchError(f"{key}: unknown strategy {parts[1]!r}; known: {', '.join(strategies.STRATEGIES)}")
        if parts[2] not in spec.defaults:
            raise CfbenchError(f"{key}: {parts[1]} has no parameter {parts[2]!r}; accepted: "
                               f"{', '.join(sorted(spec.defaults)) or 'none'}")
        return parts
    cls, sections = RunConfig, _sections()
    for i, part in enumerate(parts):
        if part not in [f.name for f in dataclasses.fields(cls)]:
            where = ".".join(parts[:i]) or "the top level"
            hint = known or "`cfbench run --print-config` lists every setting"
            raise CfbenchError(f"unknown {what} {key!r} ({part!r} is no setting of {where}); {hint}")
        if i < len(parts) - 1:
            if part not in sections:
                raise CfbenchError(f"{key}: {'.'.join(parts[:i + 1])} has no sub-settings (give its whole value: "
                                   f"{'.'.join(parts[:i + 1])}='{{...}}')")
            cls, sections = typing.get_type_hints(cls)[part], sections[part]
    return parts


def set_path(tree: dict, parts: Sequence[str], value: Any) -> None:
    """tree[a][b][c] = value, making the mappings on the way."""
    for part in parts[:-1]:
        node = tree.get(part)
        if not isinstance(node, dict):
            node = tree[part] = {}
        tree = node
    tree[parts[-1]] = value


def is_override(text: str) -> bool:
    """`key=value` with a key that reads as a dotted path (a file name may hold "=" too)."""
    key, eq, _ = text.partition("=")
    return bool(eq) and bool(key) and all(p.isidentifier() for p in key.split("."))


def override_layer(items: Sequence[str]) -> dict:
    """The config layer `key=value ...` make; each key once."""
    layer: dict = {}
    seen: set[str] = set()
    for item in items:
        key, _, text = item.partition("=")
        if key in seen:
            raise CfbenchError(f"{key}= is given twice on the command line")
        seen.add(key)
        if len(text) > MAX_OVERRIDE_CHARS:
            raise CfbenchError(f"{key}=: the value is longer than {MAX_OVERRIDE_CHARS} characters")
        parts = setting_parts(key)
        set_path(layer, parts, parse_yaml(text, f"{key}=") if text.strip() else None)
    return layer
