"""The validation layer in front of every command: values, files and folders are checked before
anything is written, and every problem is one `CfbenchError` line (the CLI exits 2)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .errors import CfbenchError

if TYPE_CHECKING:  # config reads its YAML files through this module
    from .config import RunConfig


def read_text(path: Path, what: str = "file") -> str:
    if not path.is_file():
        raise CfbenchError(f"{path}: no such {what}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CfbenchError(f"{path}: not a UTF-8 text file") from None
    except OSError as err:
        raise CfbenchError(f"{path}: cannot read it ({err.strerror})") from None


def read_json(path: Path, what: str = "file") -> Any:
    try:
        return json.loads(read_text(path, what))
    except json.JSONDecodeError as err:
        raise CfbenchError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None


def read_json_object(path: Path, what: str = "file") -> dict:
    data = read_json(path, what)
    if not isinstance(data, dict):
        raise CfbenchError(f"{path}: expected a JSON object")
    return data


def read_yaml_mapping(path: Path, what: str = "file") -> dict:
    """The file's top-level mapping; an empty file is an empty mapping."""
    try:
        data = yaml.safe_load(read_text(path, what))
    except yaml.YAMLError as err:
        raise CfbenchError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CfbenchError(f"{path}: the top level must be a mapping")
    return data


def check_writable_folder(path: Path, flag: str) -> None:
    """`path` is a folder this process can create files in, or can be created as one. Nothing is
    created here: the nearest existing ancestor is checked instead."""
    path = Path(path).expanduser()
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise CfbenchError(f"{flag} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK) or _read_only_filesystem(existing):
        raise CfbenchError(f"{flag} {path}: {existing} is not writable")


def _read_only_filesystem(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def check_run(cfg: RunConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Everything `cfbench run` can check before training: strategies and their parameters, the
    tasks and their data (listings, labels, files), the model and its weights, the output and
    cache folders. Returns (trained, eval-only) tasks."""
    import strategies

    from .models import OFFLINE_MODELS, check_model
    from .plan import check_text_needs, resolve_tasks

    for combo in cfg.strategies:
        strategies.check_params(combo, cfg.strategy_params)
    trained, eval_only = resolve_tasks(cfg)
    if cfg.model.name in OFFLINE_MODELS:  # no offline model has a text tower; every open_clip model does
        for combo in cfg.strategies:
            check_text_needs(cfg, combo, has_text=False)
    check_model(cfg.model)
    check_writable_folder(Path(cfg.out), "--out")
    if cfg.cache_dir:
        check_writable_folder(Path(cfg.cache_dir), "--cache-dir")
    check_data(trained + eval_only, cfg.data_root)
    return trained, eval_only


def check_data(names: tuple[str, ...], data_root) -> None:
    """Every dataset is usable (`tasks.loaded_task` runs the cheap checks); one line either way."""
    import tasks

    problems = []
    for name in names:
        try:
            tasks.loaded_task(name, data_root)
        except tasks.DataUnavailable as err:
            problems.append(err)
    if len(problems) == 1:
        raise problems[0]
    if problems:
        listed = ",".join(p.task for p in problems)
        root = tasks.resolve_data_root(data_root)
        raise CfbenchError(f"{len(problems)} tasks are not usable under {root} ({listed}); "
                           f"`cfbench data check --data-root {root} --tasks {listed}` says what is wrong with each")
