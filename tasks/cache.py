"""The preprocessed cache: each (task, split, selection, resolution) decoded and resized once.

Images become uint8 (N, 3, S, S) arrays in .npy files, memory-mapped on every later load.
A JSON manifest, written last and atomically, records the source fingerprint; a file without
a matching manifest is never trusted, so an interrupted or failed build is simply rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from benchmark.store import atomic_write_json

from .base import SourceSplit

CACHE_VERSION = 2  # bump when preprocessing changes: old entries stop matching
ENV_VAR = "CFBENCH_CACHE"


def cache_root(cache_dir: Optional[str] = None) -> Path:
    """--cache-dir, else $CFBENCH_CACHE, else ~/.cache/cfbench."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cfbench"


def to_square_uint8(image: Union[Image.Image, np.ndarray], size: int) -> np.ndarray:
    """CLIP-style preprocessing without normalisation: shortest side to `size` (bicubic,
    antialiased), centre crop, RGB; returns uint8 (3, size, size)."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            image = np.clip(np.rint(image.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
        image = Image.fromarray(image)
    if image.mode != "RGB":
        image = image.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    if (new_w, new_h) != (size, size):
        image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)


def decode(source: SourceSplit, idx: np.ndarray, size: int, out: Optional[np.ndarray] = None,
           desc: str = "", workers: Optional[int] = None) -> np.ndarray:
    """Decode and resize the selected samples into `out` (allocated when None), in threads:
    PIL releases the GIL while decoding and resizing."""
    if out is None:
        out = np.empty((len(idx), 3, size, size), dtype=np.uint8)
    workers = workers or min(8, os.cpu_count() or 1)
    chunks = [range(s, min(s + 64, len(idx))) for s in range(0, len(idx), 64)]

    def work(chunk: range) -> int:
        for j in chunk:
            out[j] = to_square_uint8(source.read(int(idx[j]), size), size)
        return len(chunk)

    with tqdm(total=len(idx), desc=desc, unit="img", file=sys.stderr, disable=len(idx) < 5000,
              leave=False) as bar, ThreadPoolExecutor(workers) as pool:
        for done in pool.map(work, chunks):
            bar.update(done)
    return out


def _entry(root: Path, task: str, split: str, idx: np.ndarray, size: int) -> Path:
    key = hashlib.blake2b(np.ascontiguousarray(idx, dtype=np.int64).tobytes(), digest_size=8).hexdigest()
    return root / task / f"{split}-{size}px-{len(idx)}-{key}"


def cached_images(task: str, split: str, source: SourceSplit, idx: np.ndarray, size: int,
                  cache_dir: Optional[str] = None) -> torch.Tensor:
    """uint8 (len(idx), 3, size, size) for the selected samples, from the cache or built now."""
    base = _entry(cache_root(cache_dir), task, split, idx, size)
    data, manifest = base.with_suffix(".npy"), base.with_suffix(".json")
    expected = {"version": CACHE_VERSION, "task": task, "split": split, "size": size, "count": int(len(idx)),
                "fingerprint": source.fingerprint(idx)}
    if manifest.exists() and data.exists():
        try:
            trusted = json.loads(manifest.read_text()) == expected
        except ValueError:
            trusted = False
        if trusted:
            return torch.from_numpy(np.load(data, mmap_mode="c"))
    base.parent.mkdir(parents=True, exist_ok=True)
    manifest.unlink(missing_ok=True)  # from here on, no half-built state is trusted
    tmp = data.with_name(f".{data.name}.{os.getpid()}.tmp")
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(idx), 3, size, size))
        decode(source, idx, size, out, desc=f"caching {task}/{split} at {size}px")
        out.flush()
        del out
        os.replace(tmp, data)
    finally:
        tmp.unlink(missing_ok=True)
    atomic_write_json(manifest, expected)
    return torch.from_numpy(np.load(data, mmap_mode="c"))
