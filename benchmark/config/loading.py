"""A config from its layers -- schema defaults < the protocol's preset < the user's YAML < flags --
and a run folder's config.yaml exactly as written; the experiment's settings (all but the
machine's), their digest, and where two configs first differ."""
from __future__ import annotations

import copy
import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from ..errors import CfbenchError
from ..files import read_yaml_mapping
from .protocols import protocol_settings
from .schema import DEFAULT_PROTOCOL, MACHINE_SETTINGS, RunConfig, build_config, merge, missing_keys


def read_config_file(path: Optional[str]) -> dict:
    """The user's partial config (empty without a file)."""
    if path is None:
        return {}
    p = Path(path)
    if not p.exists():
        raise CfbenchError(f"config file {path} not found")
    return read_yaml_mapping(p)


def resolve(*layers: dict) -> RunConfig:
    """Schema defaults < protocol preset < layers (in order); the protocol is the last one named."""
    name = DEFAULT_PROTOCOL
    for layer in layers:  # null leaves the default; an empty name is refused as unknown, never the demo
        name = name if layer.get("protocol") is None else layer["protocol"]
    merged = preset_tree(name)
    for layer in layers:
        rows = merged.get("rows")
        rows = [row for row in rows.values() if isinstance(row, dict)] if isinstance(rows, dict) else []
        for path in _leaf_paths({k: v for k, v in layer.items() if k not in ("rows", "protocol")}):
            for row in rows:  # a setting the user gives holds for every strategy's runs
                _prune(row, path)
        merged = merge(merged, layer)
    return build_config(merged)


def _leaf_paths(tree: dict, prefix: tuple = ()) -> list[tuple]:
    return [path for key, value in tree.items()
            for path in (_leaf_paths(value, (*prefix, key)) if isinstance(value, dict) and value
                         else [(*prefix, key)])]


def _prune(row: Any, path: tuple) -> None:
    """Removes `path` (and what is under it) from a row's nested mapping, in place."""
    for key in path[:-1]:
        row = row.get(key) if isinstance(row, dict) else None
    if isinstance(row, dict):
        row.pop(path[-1], None)


def preset_tree(protocol: str) -> dict:
    """The schema's defaults with the protocol's preset laid over them: what every layer of a
    config is laid over (a copy; computed once per protocol)."""
    if not isinstance(protocol, str):
        protocol_settings(protocol)  # its one line: not a protocol name
    return copy.deepcopy(_preset_tree(protocol))


@functools.lru_cache(maxsize=None)
def _preset_tree(protocol: str) -> dict:
    return merge(RunConfig().to_dict(), protocol_settings(protocol))


def load_config(path: Optional[str] = None, overrides: Optional[dict] = None) -> RunConfig:
    """The config of a YAML file (or none) with command-line overrides on top."""
    return resolve(read_config_file(path), overrides or {})


def load_run_config(path: Path, machine: Optional[dict] = None) -> RunConfig:
    """A run folder's config.yaml exactly as written, laid over no preset, with only the machine
    settings replaced. It must hold every key of the schema: an older version's file would
    otherwise be completed with today's defaults, silently changing the experiment."""
    data = read_yaml_mapping(Path(path), "config.yaml")
    missing = missing_keys(data)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CfbenchError(f"{path}: lacks {missing[0]}{more} (written by another cfbench version?); a run is "
                           "continued only with the settings it started with, so start it again")
    unexpected = [k for k in machine or {} if k not in MACHINE_SETTINGS]
    if unexpected:
        raise TypeError(f"not machine settings: {unexpected}")  # a caller's bug
    return build_config({**data, **(machine or {})})


def experiment_settings(settings: dict) -> dict:
    """What defines an experiment: every setting but the machine's and the output folder."""
    return {k: v for k, v in settings.items() if k not in (*MACHINE_SETTINGS, "out")}


def experiment_digest(settings: dict) -> str:
    """A short fingerprint of experiment_settings: a checkpoint and progress.json carry it, and
    --resume refuses a config.yaml whose fingerprint differs."""
    canonical = json.dumps(experiment_settings(settings), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def first_difference(a: Any, b: Any, where: str = "") -> Optional[str]:
    """The first dotted key (in sorted order) at which two nested mappings differ, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if key not in a or key not in b:
                return f"{where}{key}"
            found = first_difference(a[key], b[key], f"{where}{key}.")
            if found:
                return found
        return None
    return None if a == b else (where.rstrip(".") or "(the whole config)")


def lookup(tree: Any, dotted: str) -> Any:
    """The value at a dotted key of nested mappings, or None."""
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def dump_config(cfg: Union[RunConfig, dict]) -> str:
    data = cfg.to_dict() if isinstance(cfg, RunConfig) else cfg
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)
