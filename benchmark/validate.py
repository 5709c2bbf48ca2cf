"""The validation layer in front of every command: values, files and folders are checked before
anything is written, and every problem is one `CfbenchError` line (the CLI exits 2)."""
from __future__ import annotations

import json
import math
import os
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .errors import CfbenchError
from .safe_files import read_regular

if TYPE_CHECKING:  # config reads its YAML files through this module
    from .config import RunConfig


TEXT_BYTES = 8 * 1024 ** 2  # configs, sweep files, progress and metrics files, captions are far smaller


def read_text(path: Path, what: str = "file", limit: int = TEXT_BYTES) -> str:
    """A UTF-8 text file: a regular file of at most `limit` bytes (safe_files.read_regular)."""
    try:
        return read_regular(path, limit, what).decode("utf-8")
    except UnicodeDecodeError:
        raise CfbenchError(f"{path}: not a UTF-8 text file") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON (RFC 8259 has no NaN or Infinity)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} is too large for a number")
    return value


def _unique_keys(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"key {next(k for k in keys if keys.count(k) > 1)!r} appears twice")
    return dict(pairs)


def parse_json(text: str, source: str) -> Any:
    """Strict JSON: no NaN / Infinity literals (nor numbers that overflow to them), no key twice in
    an object."""
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as err:
        raise CfbenchError(f"{source}: not valid JSON ({err.msg}, line {err.lineno})") from None
    except (ValueError, RecursionError) as err:
        raise CfbenchError(f"{source}: not valid JSON ({str(err)[:200] or 'nested too deeply'})") from None


def read_json(path: Path, what: str = "file") -> Any:
    return parse_json(read_text(path, what), str(path))


def read_json_object(path: Path, what: str = "file") -> dict:
    data = read_json(path, what)
    if not isinstance(data, dict):
        raise CfbenchError(f"{path}: expected a JSON object")
    return data


class _NoAliasLoader(yaml.SafeLoader):
    """safe_load without anchors and aliases: a few hundred bytes of nested aliases expand to
    gigabytes once copied; no cfbench file needs them."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "anchors and aliases (*name) are not accepted; write the "
                                              "values out", event.start_mark)
        return super().compose_node(parent, index)


def parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 -- a SafeLoader subclass
    except yaml.YAMLError as err:
        raise CfbenchError(f"{source}: not valid YAML ({' '.join(str(err).split())[:300]})") from None
    except RecursionError:
        raise CfbenchError(f"{source}: not valid YAML (nested too deeply)") from None


def read_yaml_mapping(path: Path, what: str = "file") -> dict:
    """The file's top-level mapping; an empty file is an empty mapping."""
    data = parse_yaml(read_text(path, what), str(path))
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
    from tasks.cache import ENV_VAR as CACHE_ENV
    from tasks.cache import cache_root

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
    check_not_in_a_run_folder(Path(cfg.out))
    check_writable_folder(cache_root(cfg.cache_dir), "--cache-dir" if cfg.cache_dir else f"${CACHE_ENV}"
                          if os.environ.get(CACHE_ENV) else "the cache folder")
    check_data(trained + eval_only, cfg.data_root)
    check_run_files(cfg, trained + eval_only)
    return trained, eval_only


def check_not_in_a_run_folder(out: Path) -> None:
    """--out inside a run folder would nest a new invocation in it."""
    for folder in [out.expanduser().absolute(), *out.expanduser().absolute().parents]:
        if (folder / "config.yaml").is_file() and (folder / "progress.json").is_file():
            raise CfbenchError(f"--out {out}: is inside the run folder {folder}; choose a folder outside it")


def check_run_files(cfg: RunConfig, names: tuple[str, ...]) -> None:
    """The files a run reads besides the data -- prompt templates, class names, ZSCL's captions --
    read once here, before any folder exists."""
    import strategies

    from .templates import task_class_names, task_templates

    for name in names:
        task_templates(name, cfg.eval.templates)
        task_class_names(name, cfg.data_root, cfg.eval.classnames)
    for combo in cfg.strategies:
        for component, params in strategies.resolve_params(combo, cfg.strategy_params).items():
            if params.get("reference_texts"):
                strategies.read_captions(params["reference_texts"])


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
                           f"`cfbench data check --data-root {shlex.quote(str(root))} --tasks {shlex.quote(listed)}` says what "
                           "is wrong with each")
