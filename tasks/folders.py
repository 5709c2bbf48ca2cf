"""Your own dataset as a task: a folder of images by split and class (torchvision's ImageFolder
layout), named in a run config's `image_folders: {name: folder}` and then used like any task.

    folder/train/<class>/*.jpg   the classes are train's subfolders, in sorted order
    folder/test/<class>/*.jpg    every test class is a train class
    folder/val/<class>/*.jpg     optional; without it the probes hold out 10 % of train (as for
                                 every task without a fixed validation split)

Listing the folder reads no image; `cfbench data check` / `run --check` find what is missing.
"""
from __future__ import annotations

from pathlib import Path

from benchmark.errors import CfbenchError

from .base import FileSource, LoadedTask, Task, TaskIncomplete, TaskUnavailable

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".gif", ".tif", ".tiff", ".webp")
LAYOUT = "{folder}/train/<class>/*.jpg and {folder}/test/<class>/*.jpg (val/<class>/ optional; png, bmp, ... too)"


def _classes(folder: Path) -> list[str]:
    train = folder / "train"
    return sorted(p.name for p in train.iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if train.is_dir() else []


def _split(folder: Path, split: str, classes: list[str]) -> FileSource:
    found = sorted(p.name for p in (folder / split).iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [c for c in found if c not in classes]
    if unknown:
        raise TaskIncomplete(f"{folder / split} has classes that train/ lacks: {', '.join(unknown[:5])}")
    samples = [(str(path), label) for label, name in enumerate(classes) if (folder / split / name).is_dir()
               for path in sorted((folder / split / name).iterdir())
               if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()]
    if not samples:
        raise TaskIncomplete(f"{folder / split} holds no image ({', '.join(IMAGE_SUFFIXES[:4])}, ...)")
    return FileSource([p for p, _ in samples], [y for _, y in samples])


def image_folder_task(name: str, folder: str) -> Task:
    """The task `name` read from `folder` (its classes listed now, its files when it is loaded)."""
    root = Path(folder).expanduser().absolute()
    classes = _classes(root)

    def load(_data_root: Path) -> LoadedTask:
        if not (root / "train").is_dir() or not (root / "test").is_dir():
            raise TaskUnavailable(f"{root} has no train/ and test/ folders; expected {LAYOUT.format(folder=root)}")
        if not classes:
            raise TaskIncomplete(f"{root / 'train'} has no class folders")
        splits = {s: _split(root, s, classes) for s in ("train", "test", "val") if (root / s).is_dir()}
        return LoadedTask(tuple(c.replace("_", " ") for c in classes), splits, tuple(classes))

    return Task(name, len(classes), load, source=f"image folder {root} (image_folders in the run config)",
                license="yours", splits="the folder's train / test (and val, else 10 % of train held out)",
                layout=LAYOUT.format(folder=root))  # no anchors under the data root: the loader names the folder


_FOLDER_TASKS: dict[str, str] = {}  # name -> folder, of the tasks registered from image_folders


def forget_image_folders(tasks: dict[str, Task]) -> bool:
    """Remove every task registered from image_folders (a process that reads several configs);
    whether there was any."""
    had = bool(_FOLDER_TASKS)
    for name in list(_FOLDER_TASKS):
        tasks.pop(name, None)
        del _FOLDER_TASKS[name]
    return had


def register_image_folders(folders: dict[str, str], tasks: dict[str, Task]) -> None:
    """Register (or re-register, with a new folder) each `name: folder`; a built-in task's name is
    refused. `tasks` is the registry."""
    for name, folder in folders.items():
        if name in tasks and name not in _FOLDER_TASKS:
            raise CfbenchError(f"config: image_folders.{name}: {name!r} is a built-in task (cfbench list tasks); "
                               "give your folder another name")
        if not name or not name.replace("_", "").replace("-", "").isalnum():
            raise CfbenchError(f"config: image_folders: {name!r} is not a task name (letters, digits, _ and -)")
        if _FOLDER_TASKS.get(name) != folder:
            tasks[name] = image_folder_task(name, folder)
            _FOLDER_TASKS[name] = folder
