"""Dataset validation: what `cfbench data check` reports and `cfbench run` refuses before training.

The cheap checks (`check_loaded`) run inside `registry.loaded_task`, so every listing is checked
once per process, by `data check` and before any run folder exists: labels in range, every class
in the train split, every listed image file present. `deep_check` (`data check --deep`) also
decodes every image. The other helpers turn torchvision's "not found or corrupted" into a line
naming the file (`checksum_failure`) or the archive waiting to be extracted (`archive_hint`).
"""
from __future__ import annotations

import glob
import os
import shlex
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from benchmark.progress import bar as progress_bar

from .base import ArraySource, CorruptImage, FileSource, LoadedTask, Task, TaskDefect


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def missing_files(paths: Sequence[str]) -> list[str]:
    """The paths that do not exist, in order.

    Cost: one os.listdir per folder plus a set lookup per path (os.stat only for paths absent from
    their folder's listing, to stay exact on case-insensitive file systems). Measured warm on 100,000
    files in 200 folders: 0.8 µs per file, against 2 µs for one os.stat per file, so ImageNet's
    1.33 M files take about 1 s; a cold or network file system pays per folder, not per file. The
    test fixtures (5,690 files, 1 to 4 per folder) take 29 ms for all 24 tasks.
    """
    listings: dict[str, frozenset[str]] = {}
    missing = []
    for path in paths:
        folder, _, name = path.rpartition(os.sep)
        names = listings.get(folder)
        if names is None:
            if len(listings) > 64:  # sources list folder by folder: keep a few listings, not all
                listings.clear()
            try:
                names = frozenset(os.listdir(folder or os.curdir))
            except OSError:
                names = frozenset()
            listings[folder] = names
        if name not in names and not os.path.isfile(path):
            missing.append(path)
    return missing


def check_files(split: str, source: FileSource) -> None:
    missing = missing_files(source.paths)
    if missing:
        raise TaskDefect(f"the {split} split lists {_plural(len(missing), 'image')} that "
                         f"{'does' if len(missing) == 1 else 'do'} not exist, first {missing[0]} (its label file "
                         "names absent images, or the extraction is incomplete)")


def check_labels(split: str, labels: np.ndarray, num_classes: int) -> None:
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        values = np.unique(labels[bad])
        shown = ", ".join(str(v) for v in values[:5]) + (", ..." if len(values) > 5 else "")
        raise TaskDefect(f"the {split} split has {_plural(int(bad.sum()), 'label')} outside [0, {num_classes}): "
                         f"{shown}")


def check_train_covers_classes(found: LoadedTask, num_classes: int) -> None:
    """Every class needs training images; test splits only need labels in range (capped or
    partial test sets are legitimate; a class nobody can train on is a broken download)."""
    counts = np.bincount(found.splits["train"].labels, minlength=num_classes)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        shown = ", ".join(f"{i} ({found.classes[i]})" for i in empty[:3]) + (", ..." if len(empty) > 3 else "")
        raise TaskDefect(f"{len(empty)} of {num_classes} classes {'has' if len(empty) == 1 else 'have'} no image in "
                         f"the train split: {shown}")


def check_loaded(task: Task, found: LoadedTask) -> None:
    """The cheap checks, before every run: no image is opened.

    Class coverage is checked for data-root tasks only: the offline tasks are fixed package data,
    and foolbox's 20-image smoke tests cover a few of their classes by design.
    """
    for split, source in found.splits.items():
        check_labels(split, source.labels, task.num_classes)
    for split, source in found.splits.items():
        if isinstance(source, FileSource):
            check_files(split, source)
    if task.needs_data_root:
        check_train_covers_classes(found, task.num_classes)


# --- torchvision's md5 checks ---------------------------------------------------------------------

def _checksummed(cls, root: str, kwargs: dict) -> list[tuple[str, str]]:
    """(path, md5) of the files torchvision's `cls` checks, as its class attributes list them."""
    if hasattr(cls, "train_list"):  # CIFAR10, CIFAR100
        listed = cls.train_list + cls.test_list + [[cls.meta["filename"], cls.meta["md5"]]]
        return [(os.path.join(root, cls.base_folder, f), md5) for f, md5 in listed]
    if hasattr(cls, "split_list"):  # SVHN
        _, filename, md5 = cls.split_list[kwargs.get("split", "train")]
        return [(os.path.join(root, filename), md5)]
    if cls.__name__ == "Flowers102":
        return [(os.path.join(root, "flowers-102", cls._file_dict[k][0]), cls._file_dict[k][1])
                for k in ("label", "setid")]
    return []


def checksum_failure(cls, root: str, kwargs: dict) -> Optional[str]:
    """After torchvision refused a dataset: the first file failing its md5 check, named with both
    sums; None when none does. Asks torchvision's own check_integrity (as the dataset module
    sees it), so sums are computed only for a file that already failed."""
    from torchvision.datasets.utils import calculate_md5

    check = getattr(sys.modules.get(cls.__module__), "check_integrity", None)
    for path, md5 in _checksummed(cls, root, kwargs):
        if not os.path.isfile(path):
            return f"missing {path}; re-download it (cfbench data download)"
        if check is not None and not check(path, md5):
            return (f"checksum mismatch: {path} (md5 {calculate_md5(path)}, expected {md5}); "
                    "re-download it (cfbench data download)")
    return None


# --- archives not yet extracted -------------------------------------------------------------------

def _tar(archive: str, root: str, into: str = "") -> str:
    if not into:
        return f"tar -xf {shlex.quote(archive)} -C {shlex.quote(root)}"
    dest = shlex.quote(os.path.join(root, into))
    return f"mkdir -p {dest} && tar -xf {shlex.quote(archive)} -C {dest}"


def _unzip(archive: str, root: str, into: str) -> str:
    return f"unzip -q {shlex.quote(archive)} -d {shlex.quote(os.path.join(root, into))}"


def _unrar(archive: str, root: str) -> str:
    return f"unrar x {shlex.quote(archive)} {shlex.quote(os.path.join(root, 'resisc45') + os.sep)}"


def _imagenet(archive: str, root: str) -> str:
    folder = os.path.join(root, "imagenet")
    move = "" if os.path.dirname(archive) == folder else f"move the ILSVRC2012 archives into {folder}, then "
    return (move + "python -c \"import torchvision.datasets as d; "
            f"[d.ImageNet({folder!r}, split=s) for s in ('train', 'val')]\" (it needs ILSVRC2012_img_train.tar, "
            f"ILSVRC2012_img_val.tar and ILSVRC2012_devkit_t12.tar.gz in {folder})")


# task: ((glob under the data root, (archive, root) -> the command extracting it into the layout
# expected), ...): the first glob that matches names the archives; the folders are those
# torchvision's download=True extracts the same archives into.
ARCHIVES: dict[str, tuple[tuple[str, Callable[[str, str], str]], ...]] = {
    "mnist": (("MNIST/raw/*-ubyte.gz",
               lambda a, r: f"gunzip -k {shlex.quote(os.path.join(r, 'MNIST', 'raw'))}/*-ubyte.gz"),),
    "cifar10": (("cifar-10-python.tar.gz", _tar),),
    "cifar100": (("cifar-100-python.tar.gz", _tar),),
    "dtd": (("dtd/dtd-r1.0.1.tar.gz", lambda a, r: _tar(a, r, "dtd")),
            ("dtd-r1.0.1.tar.gz", lambda a, r: _tar(a, r, "dtd"))),
    "eurosat": (("eurosat/EuroSAT*.zip", lambda a, r: _unzip(a, r, "eurosat")),
                ("EuroSAT*.zip", lambda a, r: _unzip(a, r, "eurosat"))),
    "gtsrb": (("gtsrb/GTSRB*.zip", lambda a, r: _unzip(a, r, "gtsrb")),
              ("GTSRB*.zip", lambda a, r: _unzip(a, r, "gtsrb"))),
    "resisc45": (("resisc45/NWPU-RESISC45.rar", _unrar), ("NWPU-RESISC45.rar", _unrar)),
    "imagenet": (("imagenet/ILSVRC2012_img_*.tar", _imagenet), ("ILSVRC2012_img_*.tar", _imagenet)),
    "aircraft": (("fgvc-aircraft-2013b.tar.gz", _tar),),
    "caltech101": (("caltech101/101_ObjectCategories.tar.gz", lambda a, r: _tar(a, r, "caltech101")),
                   ("caltech101/caltech-101.zip", lambda a, r: _unzip(a, r, "caltech101") + " && " + _tar(
                       os.path.join(r, "caltech101", "caltech-101", "101_ObjectCategories.tar.gz"), r, "caltech101"))),
    "flowers": (("flowers-102/102flowers.tgz", lambda a, r: _tar(a, r, "flowers-102")),),
    "food101": (("food-101.tar.gz", _tar),),
    "pets": (("oxford-iiit-pet/*.tar.gz", lambda a, r: _tar(a, r, "oxford-iiit-pet")),),
    "sun397": (("SUN397.tar.gz", _tar),),
}
ARCHIVES["eurosat_mtil"] = ARCHIVES["eurosat"]


def archive_hint(name: str, root: Path) -> Optional[str]:
    """"found <archive>; extract it: <command>" when the task's archives lie under the data root."""
    for pattern, command in ARCHIVES.get(name, ()):
        found = sorted(glob.glob(os.path.join(glob.escape(str(root)), pattern)))
        if found:
            more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
            commands = dict.fromkeys(command(a, str(root)) for a in found)  # ordered, without repeats
            return f"found {found[0]}{more}; extract it: {' && '.join(commands)}"
    return None


# --- the deep check: decode everything ------------------------------------------------------------

def _decode_files(source: FileSource, bar, workers: int, block: int = 256) -> list[str]:
    def decode(i: int) -> Optional[str]:
        try:
            source.read(i)
        except CorruptImage as err:
            return str(err)
        return None

    problems: list[str] = []
    with ThreadPoolExecutor(workers) as pool:  # PIL releases the GIL while it decodes
        for start in range(0, len(source), block):
            idx = range(start, min(start + block, len(source)))
            problems += [p for p in pool.map(decode, idx) if p]
            bar.update(len(idx))
    return problems


def _check_array(split: str, source: ArraySource) -> list[str]:
    x = source.images
    if x.dtype == np.uint8:
        return []
    if np.issubdtype(x.dtype, np.floating) and np.isfinite(x).all() and x.min() >= 0 and x.max() <= 1:
        return []
    return [f"the {split} split's images are {x.dtype}, not uint8 or finite floats in [0, 1]"]


def deep_check(name: str, found: LoadedTask, workers: Optional[int] = None) -> list[str]:
    """Decode every image of every split; one line per image that cannot be decoded."""

    workers = workers or min(8, os.cpu_count() or 1)
    problems: list[str] = []
    total = sum(len(s) for s in found.splits.values())
    with progress_bar(total=total, desc=f"{name}: decoding", unit="img") as bar:
        for split, source in found.splits.items():
            if isinstance(source, FileSource):
                problems += _decode_files(source, bar, workers)
            elif isinstance(source, ArraySource):  # in memory already: only the value range can be wrong
                problems += _check_array(split, source)
                bar.update(len(source))
    return problems
