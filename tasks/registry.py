"""Task registry, availability checks and preprocessed split loading."""
from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from benchmark.errors import CfbenchError

from .base import (
    LoadedTask, SourceSplit, Task, TaskDefect, TaskIncomplete, TaskUnavailable, cap_per_class, holdout_size,
    validation_split
)
from . import folders as folder_tasks
from .coop import coop_tasks
from .offline import OFFLINE_TASKS
from .validate import archive_hint, check_loaded
from .vision import MTIL_TASKS, PAPER_TASKS

DATA_ENV_VAR = "CFBENCH_DATA"
CACHE_ENV_VAR = "CFBENCH_CACHE"
TASKS: dict[str, Task] = {}
_LOADED: dict[tuple, LoadedTask] = {}
_FORGET: list[Callable[[], None]] = [_LOADED.clear]  # what `clear_memory` empties (tasks.loading adds its splits)


def register_task(task: Task) -> Task:
    if task.name in TASKS:
        raise ValueError(f"task {task.name!r} registered twice")
    TASKS[task.name] = task
    return task


for _task in PAPER_TASKS + MTIL_TASKS + OFFLINE_TASKS:
    register_task(_task)
for _task in coop_tasks(TASKS):  # the MTIL datasets on CoOp's split lists (DIKI's)
    register_task(_task)


def register_image_folders(folders: dict[str, str]) -> None:
    """The run config's `image_folders` as tasks (tasks/folders.py); a folder given anew under a
    name forgets what was listed and loaded under it."""
    before = {n: TASKS.get(n) for n in folders}
    folder_tasks.register_image_folders(folders, TASKS)
    if any(TASKS.get(n) is not t for n, t in before.items() if t is not None):
        clear_memory()


def forget_image_folders() -> None:
    """Unregister the image_folders tasks (tests: one config's folders do not outlive its test)."""
    if folder_tasks.forget_image_folders(TASKS):
        clear_memory()


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise CfbenchError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None


class DataUnavailable(CfbenchError):
    """A task's data is missing or incomplete: one line naming the task, the path and the layout."""

    def __init__(self, task: str, status: str, detail: str):
        super().__init__(f"{task}: {status}: {detail}")
        self.task, self.status, self.detail = task, status, detail


def resolve_data_root(given: Optional[str] = None) -> Path:
    """--data-root, else $CFBENCH_DATA, else ~/data."""
    return Path(given or os.environ.get(DATA_ENV_VAR) or Path.home() / "data").expanduser()


def cache_root(cache_dir: Optional[str] = None) -> Path:
    """--cache-dir, else $CFBENCH_CACHE, else ~/.cache/cfbench."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cfbench"


def _missing_anchors(task: Task, root: Path) -> list[str]:
    return [a for a in task.anchors if not (root / a).exists()]


def _expected(task: Task) -> str:
    return f"expected layout: {task.layout}"


def loaded_task(name: str, given_root: Optional[str] = None) -> LoadedTask:
    """The task's class names and source splits, checked by `validate.check_loaded` (listing and
    file existence only: no image is decoded here). Data that is not usable is one line; missing
    data of a task that can be downloaded names its `cfbench data download` command (an archive
    left unextracted, or incomplete data, says itself what to extract or re-fetch)."""
    task, root = get_task(name), resolve_data_root(given_root)
    key = (name, str(root))
    if key in _LOADED:
        return _LOADED[key]
    found = _listed(task, root, given_root)
    _LOADED[key] = found
    return found


def _listed(task: Task, root: Path, given_root: Optional[str]) -> LoadedTask:
    name = task.name
    fetch = f"; {download_hint(name, given_root)}" if task.download is not None else ""
    missing = _missing_anchors(task, root)
    archive = archive_hint(name, root) if missing else None
    if missing and len(missing) == len(task.anchors):
        if archive:
            raise DataUnavailable(name, "missing", f"nothing extracted under {root}: {archive}")
        raise DataUnavailable(name, "missing", f"nothing found under {root}; {_expected(task)}{fetch}")
    if missing:
        raise DataUnavailable(name, "incomplete", f"missing {', '.join(str(root / m) for m in missing)}; "
                              + (archive or _expected(task)))
    try:
        found = task.loader(root)
    except TaskDefect as err:
        raise DataUnavailable(name, "incomplete", str(err)) from None
    except TaskIncomplete as err:
        raise DataUnavailable(name, "incomplete", f"{err}; " + _expected(task)) from None
    except TaskUnavailable as err:
        raise DataUnavailable(name, "missing", f"{err}{fetch}") from None
    if len(found.classes) != task.num_classes:
        raise DataUnavailable(name, "incomplete", f"{len(found.classes)} class names for {task.num_classes} classes")
    try:
        check_loaded(task, found)
    except TaskDefect as err:
        raise DataUnavailable(name, "incomplete", str(err)) from None
    return found


def task_classes(name: str, given_root: Optional[str] = None, source: bool = False) -> tuple[str, ...]:
    """Class names in label order: curated (readable), or as the source itself names them."""
    found = loaded_task(name, given_root)
    return (found.source_classes or found.classes) if source else found.classes


def split_indices(found: LoadedTask, split: str, max_per_class: Optional[int] = None,
                  seed: int = 0) -> tuple[str, np.ndarray]:
    """(source split, indices) of "train", "val", "test" or "trainval" under the task's split convention.

    Without a source "val" split, validation is the official LDIFS code's hold-out from train, and
    "trainval" is the whole source train split (ZSCL trains on it). max_per_class caps the split per
    class with a seeded choice (quick runs, linear probes).
    """
    if split not in ("train", "val", "test", "trainval"):
        raise CfbenchError(f"unknown split {split!r}; use train, val, test or trainval")
    if split == "trainval":
        if "val" in found.splits:
            raise CfbenchError("trainval of a task with a fixed validation split is its train and val splits")
        source = "train"
        idx = np.arange(len(found.splits[source]))
    elif split == "test" or "val" in found.splits:
        source = split
        idx = np.arange(len(found.splits[source]))
    else:
        source = "train"
        train, val = validation_split(len(found.splits["train"]))
        idx = train if split == "train" else val
    labels = found.splits[source].labels
    return source, idx[cap_per_class(labels[idx], max_per_class, seed=seed)]


def select(name: str, split: str, data_root: Optional[str] = None, max_per_class: Optional[int] = None,
           seed: int = 0) -> tuple[str, SourceSplit, np.ndarray]:
    """(source split name, source split, indices) that `load_split` decodes or reads from the cache."""
    found = loaded_task(name, data_root)
    source_name, idx = split_indices(found, split, max_per_class, seed)
    return source_name, found.splits[source_name], idx


def split_count(name: str, split: str, data_root: Optional[str] = None, max_per_class: Optional[int] = None,
                seed: int = 0) -> int:
    """How many images `load_split` would return (read from the listings; nothing is decoded)."""
    if split == "trainval" and "val" in loaded_task(name, data_root).splits:
        return sum(split_count(name, s, data_root, max_per_class, seed) for s in ("train", "val"))
    return len(select(name, split, data_root, max_per_class, seed)[2])


def task_status(name: str, given_root: Optional[str] = None) -> tuple[str, str, dict[str, int]]:
    """("found" | "missing" | "incomplete", what is wrong, split sizes) for `cfbench data check`."""
    try:
        found = loaded_task(name, given_root)
    except DataUnavailable as err:
        return err.status, err.detail, {}
    return "found", "", split_sizes(found)


def split_sizes(found: LoadedTask) -> dict[str, int]:
    """The sizes of "train", "val" and "test" that `split_indices` gives, counted without drawing
    the hold-out (its indices need torch's generator; its size does not)."""
    if "val" in found.splits:
        return {s: len(found.splits[s]) for s in ("train", "val", "test")}
    n, held = len(found.splits["train"]), holdout_size(len(found.splits["train"]))
    return {"train": n - held, "val": held, "test": len(found.splits["test"])}


def download_hint(name: str, given_root: Optional[str] = None) -> str:
    """The command that fetches a downloadable task into the data root a command was given."""
    root = f" --data-root {shlex.quote(str(given_root))}" if given_root else ""
    return f"fetch it with `cfbench data download --tasks {name}{root}`"


def download_task(name: str, given_root: Optional[str] = None) -> None:
    """Fetch a task's sources into the data root with its downloader. A failed download leaves
    nothing behind: what it added at the top of the data root (and the root itself, if it made
    it) is removed, so the task reads as missing, not as a half-extracted folder."""
    task, root = get_task(name), resolve_data_root(given_root)
    if task.download is None:
        raise CfbenchError(f"{name}: no automatic download; {task.layout}")
    made_root = not root.exists()
    before = set() if made_root else set(os.listdir(root))
    try:
        task.download(root)
    except BaseException as err:
        if root.is_dir():
            for entry in sorted(set(os.listdir(root)) - before):
                _remove(root / entry)
            if made_root and not os.listdir(root):
                root.rmdir()
        if isinstance(err, Exception):  # network and archive errors of every kind end up here
            raise CfbenchError(f"{name}: download failed ({type(err).__name__}: {err}); nothing was kept "
                               f"under {root}") from None
        raise
    finally:
        clear_memory()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def also_forget(clear: Callable[[], None]) -> None:
    """`clear` runs with every `clear_memory` (the loaded splits of tasks.loading)."""
    _FORGET.append(clear)


def clear_memory() -> None:
    """Forget in-process listings and splits (the on-disk cache stays)."""
    for forget in _FORGET:
        forget()
