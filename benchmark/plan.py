"""What a run will train and evaluate, and what its model must offer: read from the config alone,
shared by the runner, the up-front validation and the deviations report."""
from __future__ import annotations

import strategies
import tasks as task_registry

from .config import RunConfig
from .errors import CfbenchError


def resolve_tasks(cfg: RunConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Trained tasks and eval-only tasks; an explicit `tasks` list wins over `sequence`."""
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
    for name in trained:
        cfg.train.epochs_for(name)  # a per-task epochs map must cover every trained task
    return trained, tuple(n for n in eval_only if n not in trained)


def _check_per_task_maps(cfg: RunConfig) -> None:
    """A per-task map names only known tasks (and `default`): a typo would silently fall back."""
    for where, value in (("train.lr", cfg.train.lr), ("train.epochs", cfg.train.epochs)):
        if isinstance(value, dict):
            for key in value:
                if key != "default" and key not in task_registry.TASKS:
                    raise CfbenchError(f"config: {where} names {key!r}, which is not a task (cfbench list tasks) "
                                       "nor 'default'")


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
