"""A task's splits as preprocessed images: decoded once into the on-disk cache, then read from it.
The one part of `tasks` that needs torch (the registry, listings and checks do not)."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from benchmark.errors import CfbenchError

from .base import CorruptImage, TensorSplit
from .cache import CacheFormat, cached_images, estimated_bytes
from .compact import concat_images
from .registry import also_forget, loaded_task, resolve_data_root, select

_SPLITS: dict[tuple, TensorSplit] = {}
also_forget(_SPLITS.clear)


def load_split(name: str, split: str, image_size: int, data_root: Optional[str] = None,
               max_per_class: Optional[int] = None, seed: int = 0, cache_dir: Optional[str] = None,
               cache_format: CacheFormat = "raw") -> TensorSplit:
    """A split as uint8 (N, 3, S, S) images (a tensor, or a compact store that decodes per batch),
    from the on-disk preprocessed cache (built on first use)."""
    key = (name, split, image_size, str(resolve_data_root(data_root)), max_per_class, seed, cache_dir, cache_format)
    if key in _SPLITS:
        return _SPLITS[key]
    if split == "trainval" and "val" in loaded_task(name, data_root).splits:  # two source splits, one tensor
        parts = [load_split(name, s, image_size, data_root, max_per_class, seed, cache_dir, cache_format)
                 for s in ("train", "val")]
        _SPLITS[key] = TensorSplit(concat_images([p.x for p in parts]), torch.cat([p.y for p in parts]))
        return _SPLITS[key]
    source_name, source, idx = select(name, split, data_root, max_per_class, seed)
    try:
        x = cached_images(name, source_name, source, idx, image_size, cache_dir, cache_format)
    except CorruptImage as err:
        raise CfbenchError(f"{name}: {err}") from None
    _SPLITS[key] = TensorSplit(x, torch.from_numpy(source.labels[idx].copy()))
    return _SPLITS[key]


def cache_sizes(name: str, image_size: int, data_root: Optional[str] = None) -> dict:
    """Every image of the task (each source split once, as runs with uncapped splits read them):
    images, raw and compact cache bytes at `image_size` (JPEG estimated from a sample)."""
    found, total = loaded_task(name, data_root), {"images": 0, "raw": 0.0, "compact": 0.0, "form": set()}
    for source in found.splits.values():
        est = estimated_bytes(source, np.arange(len(source)), image_size)
        for key in ("images", "raw", "compact"):
            total[key] += est[key]
        total["form"].add(est["form"])
    total["form"] = "+".join(sorted(total["form"]))
    return total


