"""What a run will do, read from the config alone: the tasks it trains and evaluates (a `RunPlan`,
computed once by `make_plan` and handed to the runner and the up-front validation; the
deviations report reads it too), what its model must offer, its splits and its cache format."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import strategies
import tasks as task_registry

from ..errors import CfbenchError
from .schema import RunConfig, per_task_missing_message

log = logging.getLogger("cfbench")


@dataclass(frozen=True)
class RunPlan:
    trained: tuple[str, ...]    # in training order
    eval_only: tuple[str, ...]  # never trained, evaluated after every task (none of `trained`)

    @property
    def evaluated(self) -> tuple[str, ...]:
        return self.trained + self.eval_only


def make_plan(cfg: RunConfig) -> RunPlan:
    """Trained tasks and eval-only tasks; an explicit `tasks` list wins over `sequence`. Every
    per-task map has a value for every trained task."""
    plan = plan_tasks(cfg)
    check_per_task_values(cfg, plan.trained)
    return plan


def plan_tasks(cfg: RunConfig) -> RunPlan:
    """The plan's tasks alone (known, each once; per-task maps name only known tasks)."""
    if cfg.tasks:
        trained = tuple(cfg.tasks)
        for name in trained:
            task_registry.get_task(name)
        eval_only = tuple(cfg.eval_only or ())
    else:
        seq = task_registry.resolve_sequence(cfg.sequence, cfg.data_root)
        trained = seq.tasks
        eval_only = tuple(cfg.eval_only) if cfg.eval_only is not None else seq.eval_only
    for name in eval_only:
        task_registry.get_task(name)
    if len(set(trained)) != len(trained):
        raise CfbenchError(f"a task appears twice in the sequence {list(trained)}")
    _check_per_task_maps(cfg)
    return RunPlan(trained, tuple(n for n in eval_only if n not in trained))


def _check_per_task_maps(cfg: RunConfig) -> None:
    """A per-task map names only known tasks (and `default`): a typo would silently fall back."""
    for where, value in (("train.lr", cfg.train.lr), ("train.epochs", cfg.train.epochs)):
        if isinstance(value, dict):
            for key in value:
                if key != "default" and key not in task_registry.TASKS:
                    raise CfbenchError(f"config: {where} names {key!r}, which is not a task (cfbench list tasks) "
                                       "nor 'default'")


def check_per_task_values(cfg: RunConfig, trained: tuple[str, ...]) -> None:
    """train.epochs and train.lr, given per task, name a value for every trained task or a default."""
    for where, value in (("train.epochs", cfg.train.epochs), ("train.lr", cfg.train.lr)):
        if isinstance(value, dict) and "default" not in value:
            lacking = [name for name in trained if name not in value]
            if lacking:
                raise CfbenchError(per_task_missing_message(where, lacking))


def check_text_needs(cfg: RunConfig, strategy: str, has_text: bool) -> None:
    """Strategies, heads and zero-shot settings that need a text tower fail before any training."""
    if has_text:
        return
    if strategies.needs_text(strategy):
        raise CfbenchError(f"strategy {strategy} needs a text tower; {cfg.model.name} has none")
    if cfg.train.head == "text":
        raise CfbenchError(f"train.head text needs a text tower; {cfg.model.name} has none (use linear)")
    if strategies.head_init(strategy, cfg.train.head_init) == "zs":
        raise CfbenchError(f"train.head_init zs needs a text tower; {cfg.model.name} has none (use lp or zero)")
    if cfg.eval.within_task.points and "zs" in cfg.eval.within_task.kinds:
        raise CfbenchError(f"eval.within_task.kinds zs (zero-shot) needs a text tower; {cfg.model.name} has none "
                           "(use lp or head)")


def split_specs(cfg: RunConfig, trained: tuple[str, ...], eval_names: tuple[str, ...]):
    """(task, split, per-class cap) of the training splits, and of each eval dataset's probe-train,
    test and (official probe) val splits."""
    cap = cfg.eval.probe_max_per_class
    train = [(n, cfg.train.split, cfg.train.max_train_per_class) for n in trained]
    evals = {n: [(n, "train", cap), (n, "test", cfg.eval.test_max_per_class)]
             + ([(n, "val", cap)] if cfg.eval.probe == "official" else []) for n in eval_names}
    return train, evals


def lp_init_split(cfg: RunConfig) -> tuple[str, Optional[int]]:
    """(split, per-class cap) an LP-init head is fitted on: the evaluation probe's train images while the
    task trains on every one of them (the round's features then serve), else the images the task trains
    on, so that a head never sees an image its task does not (a 5-shot task's head: its 5 shots). Caps
    take from one seeded permutation per class: a smaller cap keeps the first of the same images."""
    train_cap, probe_cap = cfg.train.max_train_per_class, cfg.eval.probe_max_per_class
    if train_cap is None or (cfg.train.split == "train" and probe_cap is not None and probe_cap <= train_cap):
        return "train", probe_cap
    return cfg.train.split, train_cap


def evaluated_references(params: dict[str, dict], evaluated: tuple[str, ...]) -> list[str]:
    """A line for each strategy part whose `reference_task` (ZSCL's distillation images, the MoE selector's
    reference slot) is also a dataset the run evaluates: its cells there are not transfer to unseen data."""
    return [f"{name} reads the training images of {p['reference_task']}, which this run also evaluates: its "
            f"{p['reference_task']} cells measure a dataset it learns from, not transfer (set "
            f"strategy_params.{name}.reference_task to a dataset the run does not evaluate)"
            for name, p in params.items() if p.get("reference_task") in evaluated]


def choose_cache_format(cfg: RunConfig, trained: tuple[str, ...], eval_names: tuple[str, ...]) -> str:
    """cache_format as set, or for auto: raw while every split of the run fits cache_budget_gb as
    uint8 squares, else compact."""
    if cfg.cache_format != "auto":
        return cfg.cache_format
    train, evals = split_specs(cfg, trained, eval_names)
    specs = set(train) | {s for v in evals.values() for s in v}
    images = sum(task_registry.split_count(n, split, cfg.data_root, cap, cfg.seed) for n, split, cap in specs)
    raw_gb = images * 3 * cfg.model.image_size ** 2 / 1e9
    chosen = "raw" if raw_gb <= cfg.cache_budget_gb else "compact"
    log.info("cache_format auto: %d images = %.1f GB as raw squares, budget %.1f GB -> %s", images, raw_gb,
             cfg.cache_budget_gb, chosen)
    return chosen
