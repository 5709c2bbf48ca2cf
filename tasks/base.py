"""Task description, split helpers and preprocessing into uint8 model-ready tensors."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_TEMPLATES = ("a photo of a {}.",)


@dataclass(frozen=True)
class RawSplit:
    """Images as stored by the source: (N, H, W) or (N, H, W, 3), uint8 or float in [0, 1]."""

    images: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class Task:
    name: str
    classes: tuple[str, ...]
    source: str
    license: str
    # loader(data_root) -> {"train": RawSplit, "test": RawSplit}; raises TaskUnavailable when absent.
    loader: Callable[[Optional[str]], dict[str, RawSplit]] = field(repr=False)
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    description: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass
class TensorSplit:
    """A preprocessed split: x uint8 (N, 3, S, S), y int64 (N,)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


def validation_split(labels: np.ndarray, fraction: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random train/validation split of indices (the official LDIFS code holds out 10 %)."""
    order = np.random.default_rng(seed).permutation(len(labels))
    n_val = int(round(fraction * len(labels)))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split for sources that ship no test split."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = max(1, int(round(test_fraction * len(idx))))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def cap_per_class(labels: np.ndarray, cap: Optional[int], seed: int = 0) -> np.ndarray:
    """Indices keeping at most `cap` seeded-random samples per class (all when cap is None)."""
    if cap is None:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(labels == c))[:cap] for c in np.unique(labels)]
    return np.sort(np.concatenate(keep))


def to_model_tensor(images: np.ndarray, size: int, batch: int = 2048) -> torch.Tensor:
    """Convert source images to uint8 (N, 3, size, size), resizing with antialiasing once."""
    if images.dtype != np.uint8:
        images = np.clip(np.rint(images.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    x = torch.from_numpy(np.ascontiguousarray(images))
    if x.ndim == 3:
        x = x.unsqueeze(-1)
    x = x.permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] == (size, size):
        return x.contiguous()
    out = torch.empty((x.shape[0], 3, size, size), dtype=torch.uint8)
    for start in range(0, x.shape[0], batch):
        chunk = x[start:start + batch].float()
        resized = F.interpolate(chunk, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[start:start + batch] = resized.round().clamp(0, 255).to(torch.uint8)
    return out
