"""The preprocessed cache: each (task, split, selection, resolution) decoded and resized once.

Three stored forms (`cache_format`): `raw` uint8 (N, 3, S, S) squares, memory-mapped as one
tensor; `compact`: the source's own pixels for small array sources (`native`), else the square
as JPEG (`jpeg`), both decoded per batch (tasks/compact.py). Small array sources are resized
by the same torch code in both formats (PIL's result to <= 2 levels), so for them the format
never changes a result. A JSON manifest, written last and
atomically, records the source fingerprint and each file's size and content digest; an entry
is trusted only when all of them match (checked on every open), else it is rebuilt, so an
interrupted build, a truncated or overwritten file, or a changed source never reaches training.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal, Optional, Union

import numpy as np
import torch
from PIL import Image

from benchmark.errors import CfbenchError
from benchmark.files import atomic_write_json, read_regular
from benchmark.progress import bar as progress_bar

from .base import ArraySource, SourceSplit
from .registry import cache_root
from .compact import ImageStore, JpegImages, NativeImages, encode_jpeg, resize_square

CACHE_VERSION = 4  # bump when preprocessing changes: old entries stop matching
JPEG_QUALITY = 90  # with 4:4:4 chroma: the measured choice, see BENCHMARKS.md "Compact cache"
DIGEST_CHUNK = 16 << 20
CacheFormat = Literal["raw", "compact"]
log = logging.getLogger("cfbench")


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

    with progress_bar(total=len(idx), desc=desc, unit="img", disable=len(idx) < 5000,
              leave=False) as bar, ThreadPoolExecutor(workers) as pool:
        for done in pool.map(work, chunks):
            bar.update(done)
    return out


def _entry(root: Path, task: str, split: str, idx: np.ndarray, size: int) -> Path:
    key = hashlib.blake2b(np.ascontiguousarray(idx, dtype=np.int64).tobytes(), digest_size=8).hexdigest()
    return root / task / f"{split}-{size}px-{len(idx)}-{key}"


def stored_form(source: SourceSplit, size: int, cache_format: CacheFormat) -> str:
    """raw | native | jpeg: compact keeps array sources no larger than `size` in their own pixels."""
    if cache_format == "raw":
        return "raw"
    if isinstance(source, ArraySource) and max(source.images.shape[1:3]) <= size:
        return "native"
    return "jpeg"


def estimated_bytes(source: SourceSplit, idx: np.ndarray, size: int, sample: int = 32, seed: int = 0) -> dict:
    """What caching the selection at `size` would take, before anything is built: raw and native
    exactly; JPEG from a seeded sample of `sample` images encoded in memory."""
    form = stored_form(source, size, "compact")
    if form == "native":
        channels = 1 if source.images.ndim == 3 else 3
        compact = float(len(idx) * channels * source.images.shape[1] * source.images.shape[2])
    elif len(idx):
        pick = np.random.default_rng(seed).choice(idx, min(sample, len(idx)), replace=False)
        mean = np.mean([len(encode_jpeg(to_square_uint8(source.read(int(i), size), size), JPEG_QUALITY)) for i in pick])
        compact = float(mean * len(idx))
    else:
        compact = 0.0
    return {"images": len(idx), "raw": float(len(idx) * 3 * size * size), "compact": compact, "form": form}


def file_digest(path: Path, workers: Optional[int] = None) -> str:
    """blake2b over 16 MiB chunks hashed in threads (hashlib releases the GIL), then combined."""
    n = os.path.getsize(path)
    with open(path, "rb") as fh:
        fd = fh.fileno()

        def chunk(start: int) -> bytes:
            return hashlib.blake2b(os.pread(fd, DIGEST_CHUNK, start), digest_size=16).digest()

        with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
            parts = list(pool.map(chunk, range(0, n, DIGEST_CHUNK)))
    return hashlib.blake2b(b"".join(parts), digest_size=16).hexdigest()


def _files_of(base: Path, form: str) -> list[Path]:
    stem = f"{base.name}-{form}"
    names = {"raw": [f"{stem}.npy"], "native": [f"{stem}.npy"], "jpeg": [f"{stem}.jpg.bin", f"{stem}.offsets.npy"]}
    return [base.with_name(n) for n in names[form]]


_VERIFIED: set[tuple[str, int, int, str]] = set()  # (path, size, mtime_ns, digest) hashed by this process


def _matches(f: Path, entry: dict) -> bool:
    """Size and content digest as recorded; a file this process already hashed unchanged is not
    hashed again (the digest costs ~1 s per GB)."""
    if not f.exists():
        return False
    st = f.stat()
    key = (str(f), st.st_size, st.st_mtime_ns, entry["blake2b"])
    if key in _VERIFIED:
        return True
    if st.st_size != entry["bytes"] or file_digest(f) != entry["blake2b"]:
        return False
    _VERIFIED.add(key)
    return True


def _trusted(manifest: Path, expected: dict, files: list[Path]) -> bool:
    try:
        found = json.loads(read_regular(manifest, 64 * 1024 ** 2, "cache manifest"))
    except (CfbenchError, ValueError):
        return False
    recorded = found.pop("files", None)
    if found != expected or not isinstance(recorded, dict) or set(recorded) != {f.name for f in files}:
        return False
    for f in files:
        if not _matches(f, recorded[f.name]):
            log.warning("cache entry %s does not match its manifest (size or checksum); rebuilding it", f)
            return False
    return True


def _open(form: str, files: list[Path], size: int) -> Union[torch.Tensor, ImageStore]:
    if form == "raw":
        return torch.from_numpy(np.load(files[0], mmap_mode="c"))
    if form == "native":
        return NativeImages(np.load(files[0], mmap_mode="r"), size)
    data = np.memmap(files[0], dtype=np.uint8, mode="r") if os.path.getsize(files[0]) else np.empty(0, np.uint8)
    return JpegImages(data, np.load(files[1]), size)


def _native_pixels(source: ArraySource, idx: np.ndarray) -> np.ndarray:
    """(N, C, h, w) uint8 as `to_square_uint8` would read them (floats in [0, 1] scaled to 255)."""
    images = source.images[idx]
    if images.dtype != np.uint8:
        images = np.clip(np.rint(images.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    return images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)


def _write_jpeg(source: SourceSplit, idx: np.ndarray, size: int, data_tmp: Path, desc: str) -> np.ndarray:
    """Squares encoded in threads, written in order; returns the offsets."""
    offsets = [0]
    chunks = [idx[s:s + 64] for s in range(0, len(idx), 64)]

    def work(chunk: np.ndarray) -> list[bytes]:
        return [encode_jpeg(to_square_uint8(source.read(int(i), size), size), JPEG_QUALITY) for i in chunk]

    with open(data_tmp, "wb") as fh, ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool, \
            progress_bar(total=len(idx), desc=desc, unit="img", disable=len(idx) < 5000, leave=False) as bar:
        for encoded in pool.map(work, chunks):
            for blob in encoded:
                fh.write(blob)
                offsets.append(offsets[-1] + len(blob))
            bar.update(len(encoded))
    return np.asarray(offsets, dtype=np.int64)


def _build(form: str, source: SourceSplit, idx: np.ndarray, size: int, files: list[Path], desc: str) -> None:
    """Write every file of the entry under a temporary name, then rename them into place."""
    tmps = [f.with_name(f".{f.name}.{os.getpid()}.tmp") for f in files]
    try:
        if form == "raw":
            out = np.lib.format.open_memmap(tmps[0], mode="w+", dtype=np.uint8, shape=(len(idx), 3, size, size))
            if stored_form(source, size, "compact") == "native":  # the very pixels compact would give
                for s in range(0, len(idx), 1024):
                    out[s:s + 1024] = resize_square(torch.from_numpy(_native_pixels(source, idx[s:s + 1024])), size)
            else:
                decode(source, idx, size, out, desc=desc)
            out.flush()
            del out
        elif form == "native":
            with open(tmps[0], "wb") as fh:
                np.save(fh, _native_pixels(source, idx))
        else:
            offsets = _write_jpeg(source, idx, size, tmps[0], desc)
            with open(tmps[1], "wb") as fh:
                np.save(fh, offsets)
        for tmp, f in zip(tmps, files):
            os.replace(tmp, f)
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)


def clean_stale_tmp(folder: Path) -> None:
    """Remove temporary files of builds whose process is gone (killed mid-build)."""
    for tmp in folder.glob(".*.tmp"):
        try:
            pid = int(tmp.name.rsplit(".", 2)[-2])
            os.kill(pid, 0)
        except ValueError:
            continue
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except PermissionError:
            pass


def cached_images(task: str, split: str, source: SourceSplit, idx: np.ndarray, size: int,
                  cache_dir: Optional[str] = None,
                  cache_format: CacheFormat = "raw") -> Union[torch.Tensor, ImageStore]:
    """The selected samples' images at `size`, from the cache or built now: a uint8
    (len(idx), 3, size, size) tensor (raw) or a store that decodes per batch (compact)."""
    base = _entry(cache_root(cache_dir), task, split, idx, size)
    form = stored_form(source, size, cache_format)
    files = _files_of(base, form)
    manifest = base.with_name(f"{base.name}-{form}.json")
    expected = {"version": CACHE_VERSION, "task": task, "split": split, "size": size, "count": int(len(idx)),
                "form": form, "jpeg_quality": JPEG_QUALITY if form == "jpeg" else None,
                "fingerprint": source.fingerprint(idx)}
    if manifest.exists() and _trusted(manifest, expected, files):
        return _open(form, files, size)
    base.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(base.parent)
    manifest.unlink(missing_ok=True)  # from here on, no half-built state is trusted
    try:
        _build(form, source, idx, size, files, desc=f"caching {task}/{split} at {size}px ({form})")
    except OSError as err:  # a full disk or quota: one line, and nothing half-built is trusted
        raise CfbenchError(f"caching {task}/{split} failed: {err.filename or base.parent}: {err.strerror or err} "
                           f"(a full disk? free space or choose another --cache-dir)") from None
    atomic_write_json(manifest, {**expected, "files": {f.name: {"bytes": os.path.getsize(f), "blake2b": file_digest(f)}
                                                       for f in files}})
    return _open(form, files, size)
