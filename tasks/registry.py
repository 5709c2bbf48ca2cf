"""Task registry and preprocessed split loading."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from benchmark.errors import CfbenchError

from .base import Task, TensorSplit, cap_per_class, to_model_tensor, validation_split
from .offline import OFFLINE_TASKS, TaskUnavailable

TASKS: dict[str, Task] = {}
_CACHE: dict[tuple, TensorSplit] = {}
_RAW: dict[tuple, dict] = {}


def register_task(task: Task) -> Task:
    if task.name in TASKS:
        raise ValueError(f"task {task.name!r} registered twice")
    TASKS[task.name] = task
    return task


for _task in OFFLINE_TASKS:
    register_task(_task)


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise CfbenchError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None


def _raw(task: Task, data_root: Optional[str]) -> dict:
    key = (task.name, data_root)
    if key not in _RAW:
        try:
            _RAW[key] = task.loader(data_root)
        except TaskUnavailable as err:
            raise CfbenchError(str(err)) from None
    return _RAW[key]


def task_available(name: str, data_root: Optional[str] = None) -> tuple[bool, str]:
    try:
        raw = _raw(get_task(name), data_root)
    except CfbenchError as err:
        return False, str(err)
    n_source = len(raw["train"].labels)
    n_val = len(validation_split(raw["train"].labels, fraction=0.1, seed=0)[1])
    return True, (f"train {n_source - n_val}, val {n_val}, test {len(raw['test'].labels)}, "
                  f"{get_task(name).num_classes} classes")


def load_split(name: str, split: str, image_size: int, data_root: Optional[str] = None,
               max_per_class: Optional[int] = None, seed: int = 0) -> TensorSplit:
    """A split as uint8 (N, 3, S, S) tensors, decoded and resized once per process.

    split: "train" (source train minus the seeded 10 % validation split), "val", or "test".
    max_per_class caps the split per class with a seeded choice (quick runs, linear probes).
    """
    if split not in ("train", "val", "test"):
        raise CfbenchError(f"unknown split {split!r}; use train, val or test")
    key = (name, split, image_size, data_root, max_per_class, seed)
    if key in _CACHE:
        return _CACHE[key]
    raw = _raw(get_task(name), data_root)
    src = raw["test" if split == "test" else "train"]
    idx = np.arange(len(src.labels))
    if split != "test":
        train_idx, val_idx = validation_split(src.labels, fraction=0.1, seed=0)
        idx = train_idx if split == "train" else val_idx
    idx = idx[cap_per_class(src.labels[idx], max_per_class, seed=seed)]
    _CACHE[key] = TensorSplit(to_model_tensor(src.images[idx], image_size),
                              torch.from_numpy(src.labels[idx].astype(np.int64)))
    return _CACHE[key]
