"""The up-front checks of a whole run (`cfbench run`, `--check`, a sweep's driver): values, data,
model, weights, files and folders are checked before anything is written; every problem found in
the pass is reported, one line each with its fix (the CLI exits 2)."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import strategies
import tasks
from tasks.registry import CACHE_ENV_VAR as CACHE_ENV
from tasks.registry import cache_root

from ..errors import CfbenchError, CfbenchProblems
from ..models.catalog import OFFLINE_MODELS, check_model, pretrained_tags
from ..models.weights import require_alexnet, require_cached
from .plan import RunPlan, check_per_task_values, check_text_needs, plan_tasks
from .schema import ModelConfig, RunConfig
from .templates import task_class_names, task_templates


def check_writable_folder(path: Path, flag: str) -> None:
    """`path` is a folder this process can create folders and files in, or can be created as one:
    tried in the nearest existing ancestor with a temporary folder holding a temporary file, both
    removed at once (permission bits and mount flags do not tell: /proc passes them, then refuses)."""
    path = Path(path).expanduser()
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise CfbenchError(f"{flag} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK) or _read_only_filesystem(existing) or not _can_write_in(existing):
        raise CfbenchError(f"{flag} {path}: {existing} is not writable")


def _can_write_in(folder: Path) -> bool:
    try:
        trial = tempfile.mkdtemp(prefix=".cfbench-writable-", dir=folder)
    except OSError:
        return False
    try:
        fd, name = tempfile.mkstemp(dir=trial)
        os.close(fd)
        os.unlink(name)
        return True
    except OSError:
        return False
    finally:
        os.rmdir(trial)


def _read_only_filesystem(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


class Problems:
    """The problems of one check, each one `CfbenchError` line; `collect` keeps checking past one."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    @contextmanager
    def collect(self):
        try:
            yield
        except CfbenchError as err:
            if str(err) not in self.lines:
                self.lines.append(str(err))

    def raise_any(self) -> None:
        """One problem: its line as it is. Several: a count, then one line each."""
        if len(self.lines) == 1:
            raise CfbenchError(self.lines[0])
        if self.lines:
            raise CfbenchProblems(self.lines)


def check_run(cfg: RunConfig, load_checkpoint: bool = False) -> RunPlan:
    """Everything `cfbench run` can check before training, in one pass: strategies and their
    parameters, the tasks, per-task maps, the model and whether its weights are here (with
    `load_checkpoint`, as `--check` asks, a local checkpoint file is loaded too: a run loads it
    anyway before it writes anything), the output and cache folders, each task's data, and the
    files a run reads. Every problem found is reported (one line each, with its fix); returns the
    run's plan."""
    for combo in cfg.strategies:  # unknown names stop here: nothing else can be checked of them
        strategies.parse_strategy(combo)
    problems = Problems()
    for combo in cfg.strategies:
        own = cfg.for_strategy(combo)  # its row of the protocol, if it has one
        with problems.collect():
            strategies.check_params(combo, own.strategy_params)
        with problems.collect():
            check_settings_used(own, combo)
    plan = plan_tasks(cfg)  # unknown tasks stop here: nothing below can be checked without them
    with problems.collect():
        check_per_task_values(cfg, plan.trained)
    if cfg.model.name in OFFLINE_MODELS:  # no offline model has a text tower; every open_clip model does
        for combo in cfg.strategies:
            with problems.collect():
                check_text_needs(cfg, combo, has_text=False)
    with problems.collect():
        check_model(cfg.model)
        check_weights_here(cfg.model)
        if load_checkpoint:
            check_checkpoint_loads(cfg.model)
    with problems.collect():
        check_writable_folder(Path(cfg.out), "--out")
        check_not_in_a_run_folder(Path(cfg.out))
    with problems.collect():
        check_writable_folder(cache_root(cfg.cache_dir), "--cache-dir" if cfg.cache_dir else f"${CACHE_ENV}"
                              if os.environ.get(CACHE_ENV) else "the cache folder")
    usable = []
    for name in plan.evaluated:
        with problems.collect():
            tasks.loaded_task(name, cfg.data_root)  # the cheap checks; its line says how to get the data
            usable.append(name)
    with problems.collect():
        check_run_files(cfg, tuple(usable))
    problems.raise_any()
    return plan


def check_weights_here(model: ModelConfig) -> None:
    """An open_clip tag's weights are cached on this machine (a run never downloads them: on a
    machine without internet that is a minute of hub retries before the same failure)."""
    tag = model.pretrained
    if model.name in OFFLINE_MODELS or not tag or os.path.isfile(tag) or tag not in pretrained_tags(model.name):
        return
    require_cached(model.name, tag)


def check_checkpoint_loads(model: ModelConfig) -> None:
    """A local checkpoint file loads into the model, by the run's own loader. The one check that
    imports torch (and open_clip or timm), and only when `pretrained` is a file: whether a file is a
    loadable state dict of this architecture is known only by loading it."""
    if model.pretrained and os.path.isfile(model.pretrained):
        from ..models.factory import build_model

        build_model(model)


def check_not_in_a_run_folder(out: Path) -> None:
    """--out inside a run folder would nest a new invocation in it."""
    for folder in [out.expanduser().absolute(), *out.expanduser().absolute().parents]:
        if (folder / "config.yaml").is_file() and (folder / "progress.json").is_file():
            raise CfbenchError(f"--out {out}: is inside the run folder {folder}; choose a folder outside it")


def check_settings_used(cfg: RunConfig, combo: str) -> None:
    """A setting the combination's own loss replaces would be recorded as a change that changes
    nothing: train.label_smoothing under a strategy that replaces the loss (ls, flyp); and fixed
    pretrained zero-shot classifiers cannot follow a strategy that routes each evaluation batch."""
    owner = next((s.name for s in strategies.parse_strategy(combo) if "loss" in s.replaces), None)
    if owner and cfg.train.label_smoothing:
        hint = " (its own smoothing is strategy_params.ls.smoothing)" if owner == "ls" else ""
        raise CfbenchError(f"train.label_smoothing {cfg.train.label_smoothing:g} is not used by {combo}: {owner} "
                           f"replaces the loss{hint}; leave train.label_smoothing at 0")
    router = next((s.name for s in strategies.parse_strategy(combo) if s.routes_eval_batches), None)
    if router and cfg.eval.zs_text == "pretrained":
        raise CfbenchError(f"eval.zs_text pretrained would classify {combo}'s images with the pretrained text "
                           f"tower, but {router} routes each evaluation batch through both towers; set eval.zs_text: "
                           "current")


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
            if component == "moe-adapters" and params["extractor"] == "alexnet":
                require_alexnet()


def check_data(names: tuple[str, ...], data_root) -> None:
    """Every dataset is usable; one line per task that is not."""
    problems = Problems()
    for name in names:
        with problems.collect():
            tasks.loaded_task(name, data_root)
    problems.raise_any()
