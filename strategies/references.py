"""What builders read of a run's data: a task's cached images as a reference set, and its class
prompts as the run names them (the runner's `template_of` / `classes_of`; without them the task's
defaults)."""
from __future__ import annotations

from typing import Callable

from tasks import get_task, task_classes
from tasks.loading import load_split

from .context import BuildContext


def reference_images(ctx: BuildContext, task: str, split: str):
    """A split of a task as a reference image set (the cached, un-augmented images)."""
    return load_split(task, split, ctx.image_size, ctx.data_root, seed=ctx.seed, cache_dir=ctx.cache_dir,
                      cache_format=ctx.cache_format).x


def training_images(ctx: BuildContext, task: str):
    """The images `task` trains on: `train.split` as the run caps it (the same seeded selection), so
    that distillation on a task's own data (LwF, iCaRL's memory) sees no image the task did not."""
    return load_split(task, ctx.train_split, ctx.image_size, ctx.data_root, ctx.train_cap, ctx.seed, ctx.cache_dir,
                      ctx.cache_format).x


def class_prompts(ctx: BuildContext, task: str) -> list[str]:
    """One prompt per class: the first template over the class names the run uses."""
    template = ctx.template_of(task) if ctx.template_of else get_task(task).templates[0]
    classes = ctx.classes_of(task) if ctx.classes_of else task_classes(task, ctx.data_root)
    return [template.format(c) for c in classes]


def prompts_for(ctx: BuildContext) -> Callable[[int], tuple[list[str], list[str]]]:
    """task index -> (class names, every template) of that task, as the run names them."""
    def prompts(t: int) -> tuple[list[str], list[str]]:
        name = ctx.tasks[t]
        classes = ctx.classes_of(name) if ctx.classes_of else task_classes(name, ctx.data_root)
        return list(classes), list(ctx.templates_of(name) if ctx.templates_of else get_task(name).templates)
    return prompts
