"""The up-front checks of a whole run (`cfbench run`, `--check`, a sweep's driver): values, data,
model, files and folders are checked before anything is written, and every problem is one
`CfbenchError` line (the CLI exits 2)."""
from __future__ import annotations

import os
import shlex
from pathlib import Path

import strategies
import tasks
from tasks.registry import CACHE_ENV_VAR as CACHE_ENV
from tasks.registry import cache_root

from ..errors import CfbenchError
from ..models import OFFLINE_MODELS, check_model
from .plan import RunPlan, check_text_needs, make_plan
from .schema import RunConfig
from .templates import task_class_names, task_templates


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


def check_run(cfg: RunConfig) -> RunPlan:
    """Everything `cfbench run` can check before training: strategies and their parameters, the
    tasks and their data (listings, labels, files), the model and its weights, the output and
    cache folders, the files a run reads. Returns the run's plan."""
    for combo in cfg.strategies:
        strategies.check_params(combo, cfg.strategy_params)
    plan = make_plan(cfg)
    if cfg.model.name in OFFLINE_MODELS:  # no offline model has a text tower; every open_clip model does
        for combo in cfg.strategies:
            check_text_needs(cfg, combo, has_text=False)
    check_model(cfg.model)
    check_writable_folder(Path(cfg.out), "--out")
    check_not_in_a_run_folder(Path(cfg.out))
    check_writable_folder(cache_root(cfg.cache_dir), "--cache-dir" if cfg.cache_dir else f"${CACHE_ENV}"
                          if os.environ.get(CACHE_ENV) else "the cache folder")
    check_data(plan.evaluated, cfg.data_root)
    check_run_files(cfg, plan.evaluated)
    return plan


def check_not_in_a_run_folder(out: Path) -> None:
    """--out inside a run folder would nest a new invocation in it."""
    for folder in [out.expanduser().absolute(), *out.expanduser().absolute().parents]:
        if (folder / "config.yaml").is_file() and (folder / "progress.json").is_file():
            raise CfbenchError(f"--out {out}: is inside the run folder {folder}; choose a folder outside it")


def check_run_files(cfg: RunConfig, names: tuple[str, ...]) -> None:
    """The files a run reads besides the data -- prompt templates, class names, ZSCL's captions --
    read once here, before any folder exists."""


    for name in names:
        task_templates(name, cfg.eval.templates)
        task_class_names(name, cfg.data_root, cfg.eval.classnames)
    for combo in cfg.strategies:
        for component, params in strategies.resolve_params(combo, cfg.strategy_params).items():
            if params.get("reference_texts"):
                strategies.read_captions(params["reference_texts"])


def check_data(names: tuple[str, ...], data_root) -> None:
    """Every dataset is usable (`tasks.loaded_task` runs the cheap checks); one line either way."""

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
