"""Tasks, their source splits (in-memory arrays or image files) and the split conventions."""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence, Union

import numpy as np
from PIL import Image

from .metadata import templates

if TYPE_CHECKING:  # the registry and its checks run without torch (tasks.loading makes the tensors)
    import torch

    from .compact import ImageStore


class TaskUnavailable(Exception):
    """The task's data is not where it is expected; the message says where to get it."""


class TaskIncomplete(TaskUnavailable):
    """Part of the task's data is there, part is missing."""


class TaskDefect(TaskIncomplete):
    """The data is there but wrong (a file a listing names is absent, a label out of range, a
    checksum mismatch): the message names the file or value, so no layout hint is added to it."""


class CorruptImage(Exception):
    """An image file of a task cannot be decoded; the message names the file."""


class SourceSplit:
    """One split as the source stores it: labels now, images one at a time on demand."""

    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, i: int, size: Optional[int] = None) -> Union[Image.Image, np.ndarray]:
        """Sample i; `size` (the side it will be resized to) lets decoders skip detail."""
        raise NotImplementedError

    def fingerprint(self, idx: np.ndarray) -> str:
        """Changes whenever the selected samples' source changes."""
        raise NotImplementedError


class ArraySource(SourceSplit):
    """Images held in one array (N, H, W) or (N, H, W, 3), uint8 or float in [0, 1]."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, np.asarray(labels, dtype=np.int64)

    def read(self, i: int, size: Optional[int] = None) -> np.ndarray:
        return self.images[i]

    @cached_property
    def _content_hash(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{self.images.shape}{self.images.dtype}".encode())
        h.update(np.ascontiguousarray(self.images).data)
        h.update(self.labels.tobytes())
        return h.hexdigest()

    def fingerprint(self, idx: np.ndarray) -> str:
        return self._content_hash  # the selection is part of the cache key already


class FileSource(SourceSplit):
    """One image file per sample (JPEG, PNG, PPM, ...), decoded with PIL."""

    def __init__(self, paths: Sequence[Union[str, Path]], labels: Sequence[int]):
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} files but {len(labels)} labels")
        self.paths = [str(p) for p in paths]
        self.labels = np.asarray(labels, dtype=np.int64)

    def read(self, i: int, size: Optional[int] = None) -> Image.Image:
        path = self.paths[i]
        try:
            with Image.open(path) as img:
                if size:  # JPEG: decode at the smallest DCT scale still >= size on both sides
                    img.draft("RGB", (size, size))
                return img.convert("RGB")
        except Exception as err:  # PIL raises many types for truncated or foreign files
            raise CorruptImage(f"cannot decode image {path}: {err}") from None

    def fingerprint(self, idx: np.ndarray) -> str:
        h = hashlib.blake2b(digest_size=16)
        for i in idx:
            st = os.stat(self.paths[i])
            h.update(f"{self.paths[i]}|{st.st_size}|{st.st_mtime_ns}|{self.labels[i]}\n".encode())
        return h.hexdigest()


@dataclass
class LoadedTask:
    """What a loader found: class names in label order and the source's splits."""

    classes: tuple[str, ...]
    splits: dict[str, SourceSplit]  # "train", "test" and, where the source fixes one, "val"
    source_classes: tuple[str, ...] = ()  # the names as the source gives them (before curation); () = classes


@dataclass(frozen=True)
class Task:
    name: str
    num_classes: int
    # loader(data_root) -> LoadedTask; raises TaskUnavailable (or TaskIncomplete) naming what is missing.
    loader: Callable[[Path], LoadedTask] = field(repr=False)
    source: str = ""          # where the data comes from and how to obtain it
    license: str = ""
    sizes: str = ""           # split sizes of the full dataset, for `cfbench list tasks`
    splits: str = ""          # the split convention used
    layout: str = ""          # expected layout under the data root; "" for package data
    templates_key: str = ""   # clip-benchmark's template key; "" for the default template
    download: Optional[Callable[[Path], None]] = field(default=None, repr=False)
    anchors: tuple[str, ...] = ()  # paths under the data root whose presence marks the task as there

    @property
    def templates(self) -> tuple[str, ...]:
        return templates(self.templates_key)

    @property
    def needs_data_root(self) -> bool:
        return bool(self.layout)


@dataclass
class TensorSplit:
    """A preprocessed split: x uint8 (N, 3, S, S) (a tensor, or a compact `ImageStore` read with
    `tasks.compact.gather`), y int64 (N,)."""

    x: torch.Tensor | ImageStore
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


def random_split_indices(n: int, first: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The indices torch.utils.data.random_split(range(n), [first, n - first], seed) assigns."""
    import torch  # torch's own generator draws them; only drawing the indices needs it (sizes: holdout_size)

    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    return perm[:first], perm[first:]


def holdout_size(n: int, fraction: float = 0.1, max_val: int = 20000) -> int:
    """How many of n source train samples the validation hold-out takes (`validation_split`)."""
    return min(int(n * fraction), max_val)


def validation_split(n: int, fraction: float = 0.1, max_val: int = 20000,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The official LDIFS code's hold-out: int(10 % of train), at most 20,000, torch seed 0.

    Returns sorted (train, val) indices into the source train split.
    """
    n_val = holdout_size(n, fraction, max_val)
    train, val = random_split_indices(n, n - n_val, seed)
    return np.sort(train), np.sort(val)


_PUBLISHED = re.compile(r"~?([0-9][0-9,]*) ([a-z]+)(.*)")
_SPLIT_WORDS = {"train": "train", "trainval": "train", "probe": "train", "val": "val", "test": "test"}


def published_counts(task: Task) -> dict[str, int]:
    """The split sizes a task's `sizes` line publishes, as {"train": n, "test": n} and "val" where
    the source fixes a validation split: "8,144 train / 8,041 test", "3,680 trainval / ...",
    "50,000 val (used as test)" (a val split the task tests on), "~87,000 train" (approximate)."""
    counts: dict[str, int] = {}
    for part in task.sizes.split("/"):
        found = _PUBLISHED.fullmatch(part.strip())
        word = _SPLIT_WORDS.get(found.group(2)) if found else None
        if word is None:
            raise ValueError(f"task {task.name}: cannot read split sizes from {task.sizes!r}")
        if word == "val" and "used as test" in found.group(3):
            word = "test"
        counts[word] = int(found.group(1).replace(",", ""))
    if "train" not in counts or "test" not in counts:
        raise ValueError(f"task {task.name}: sizes {task.sizes!r} name no train and test counts")
    return counts


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split for small sources that ship no test split."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = max(1, int(round(test_fraction * len(idx))))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def cap_per_class(labels: np.ndarray, cap: Optional[int], seed: int = 0) -> np.ndarray:
    """Positions keeping at most `cap` seeded-random samples per class (all when cap is None)."""
    if cap is None:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(labels == c))[:cap] for c in np.unique(labels)]
    return np.sort(np.concatenate(keep)) if keep else np.arange(0)
