"""Run configuration: defaults (the offline demo), YAML loading, validation, resolution."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import CfbenchError

DEFAULTS: dict[str, Any] = {
    "sequence": "demo",          # a named sequence (`cfbench list sequences`)...
    "tasks": None,               # ...or an explicit list of trained tasks (wins over sequence)
    "eval_only": None,           # never-trained eval datasets; None = the sequence's own
    "strategies": ["ft", "ldifs"],
    # {strategy: {param: value}}, see `cfbench list strategies`. LDIFS's alpha = 10 is the official
    # value for ViTs; on CNN slices normalized along channels the distance is ~3 orders of magnitude
    # smaller (measured on the demo), so the offline EfficientNet demo uses alpha = 1e4.
    "strategy_params": {"ldifs": {"alpha": 10000.0}},
    "model": {"name": "efficientnet_lite0", "pretrained": "package", "image_size": None,
              "freeze_bn": True},  # image_size None: the model's default (efficientnet_lite0: 64)
    "train": {"optimizer": "adamw", "lr": 1.0e-3, "weight_decay": 0.1, "batch_size": 64, "epochs": 3,
              "max_train_per_class": 450, "head_init": "lp",
              "warmup_steps": 20, "precision": "auto",  # precision auto: bf16 autocast on CUDA
              "compile": False},  # torch.compile the encoder (worth it on GPUs; compiling takes a while)
    "eval": {"probe_max_per_class": 100, "test_max_per_class": None, "probe_C": 1.0, "batch_size": 256},
    "data_root": None,           # datasets of the paper / MTIL; None = $CFBENCH_DATA or ~/data
    "cache_dir": None,           # preprocessed uint8 cache; None = $CFBENCH_CACHE or ~/.cache/cfbench
    "out": "results",
    "device": "auto",
    "seed": 0,
    "threads": None,             # torch intra-op threads; None = every core of this machine
}

CHOICES = {("train", "optimizer"): ("adamw", "sgd"), ("train", "head_init"): ("lp", "zero"),
           ("train", "precision"): ("auto", "fp32", "bf16"),
           ("device",): ("auto", "cpu", "cuda")}


def _merge(base: dict, update: dict, path: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        where = f"{path}{key}"
        if key not in base:
            raise CfbenchError(f"config: unknown key {where!r}; known: {', '.join(base)}")
        if isinstance(base[key], dict) and not isinstance(value, dict):
            raise CfbenchError(f"config: {where!r} must be a mapping")
        if key == "strategy_params":  # any strategy name; each one's parameters replace the default's
            out[key] = {**base[key], **copy.deepcopy(value)}
        elif isinstance(base[key], dict):
            out[key] = _merge(base[key], value, where + ".")
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_config(path: Optional[str]) -> dict:
    if path is None:
        return copy.deepcopy(DEFAULTS)
    p = Path(path)
    if not p.is_file():
        raise CfbenchError(f"config file {path} not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise CfbenchError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise CfbenchError(f"{path}: the top level must be a mapping")
    return apply_overrides(copy.deepcopy(DEFAULTS), data)


def apply_overrides(cfg: dict, overrides: dict) -> dict:
    cfg = _merge(cfg, overrides)
    validate(cfg)
    return cfg


def validate(cfg: dict) -> None:
    for keys, allowed in CHOICES.items():
        value = cfg
        for k in keys:
            value = value[k]
        if value not in allowed:
            raise CfbenchError(f"config: {'.'.join(keys)} must be one of {allowed}, not {value!r}")
    positive = [("train", "lr"), ("train", "batch_size"), ("train", "epochs"), ("eval", "batch_size"),
                ("eval", "probe_C")]
    for section, key in positive:
        value = cfg[section][key]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise CfbenchError(f"config: {section}.{key} must be a positive number, not {value!r}")
    size = cfg["model"]["image_size"]
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 8):
        raise CfbenchError(f"config: model.image_size must be an integer >= 8 or null, not {size!r}")
    if not isinstance(cfg["train"]["compile"], bool):
        raise CfbenchError(f"config: train.compile must be true or false, not {cfg['train']['compile']!r}")
    if not isinstance(cfg["strategies"], list) or not cfg["strategies"]:
        raise CfbenchError("config: strategies must be a non-empty list")
    if cfg["threads"] is not None and (not isinstance(cfg["threads"], int) or cfg["threads"] < 1):
        raise CfbenchError(f"config: threads must be a positive integer or null, not {cfg['threads']!r}")


def dump_config(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)
