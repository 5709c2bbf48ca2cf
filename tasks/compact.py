"""Compact image stores: what the cache keeps instead of raw uint8 squares, decoded per batch.

- `NativeImages`: array sources no larger than the model's resolution (MNIST, CIFAR, SVHN, ...)
  keep their own pixels, (N, C, h, w) uint8; each batch is resized on the device it is asked for
  with torch's antialiased bicubic (PIL's kernel, a = -0.5), then centre-cropped: the geometry
  of `to_square_uint8`.
- `JpegImages`: everything else is stored as the `to_square_uint8` square, JPEG-encoded, in one
  byte file with an offsets array; a batch is decoded with torchvision (nvJPEG on CUDA, libjpeg-turbo
  in threads on the CPU).

Both answer `gather(idx, device)` with uint8 (B, 3, S, S) on `device`, and index like the raw
tensor (`store[idx]` on the CPU), so training, reference passes and evaluation read any form.
"""
from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

Index = Union[int, slice, np.ndarray, torch.Tensor, Sequence[int]]
DECODE_CHUNK = 32  # images per CPU decode call


def _positions(idx: Index, n: int) -> np.ndarray:
    if isinstance(idx, slice):
        return np.arange(n)[idx]
    if isinstance(idx, torch.Tensor):
        idx = idx.cpu().numpy()
    out = np.asarray(idx, dtype=np.int64).reshape(-1)
    return np.where(out < 0, out + n, out)


def square_geometry(h: int, w: int, size: int) -> tuple[int, int, int, int]:
    """(resized h, resized w, top, left) of `to_square_uint8`: shortest side to size, centre crop."""
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    return new_h, new_w, (new_h - size) // 2, (new_w - size) // 2


def resize_square(x: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B, C, h, w), C in {1, 3} -> uint8 (B, 3, size, size) on x's device."""
    h, w = x.shape[-2:]
    new_h, new_w, top, left = square_geometry(h, w, size)
    # PIL's order: the horizontal pass, rounded to uint8, then the vertical pass
    for shape in ((h, new_w), (new_h, new_w)):
        if shape != tuple(x.shape[-2:]):
            x = F.interpolate(x.float(), size=shape, mode="bicubic", antialias=True, align_corners=False)
            x = x.round_().clamp_(0, 255).to(torch.uint8)
    x = x[..., top:top + size, left:left + size]
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x.contiguous()


class ImageStore:
    """A cached split's images in a compact form; subclasses decode `gather`."""

    side: int  # S: images come out (3, S, S)
    dtype = torch.uint8

    def __len__(self) -> int:
        raise NotImplementedError

    def gather(self, idx: Index, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self), 3, self.side, self.side)

    def size(self, dim: Optional[int] = None):  # as torch.Tensor.size (TensorDataset asks for it)
        return torch.Size(self.shape) if dim is None else self.shape[dim]

    def __getitem__(self, idx: Index) -> torch.Tensor:
        if isinstance(idx, (int, np.integer)):
            return self.gather([int(idx)])[0]
        return self.gather(idx)


class NativeImages(ImageStore):
    """Source pixels (N, C, h, w) uint8, resized per batch."""

    def __init__(self, pixels: np.ndarray, size: int):
        self.pixels, self.side = pixels, size

    def __len__(self) -> int:
        return len(self.pixels)

    def gather(self, idx: Index, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
        pos = _positions(idx, len(self))
        x = torch.from_numpy(np.ascontiguousarray(self.pixels[pos])).to(device, non_blocking=True)
        return resize_square(x, self.side)


class JpegImages(ImageStore):
    """JPEG files back to back in `data`; image i is data[offsets[i]:offsets[i + 1]]."""

    def __init__(self, data: np.ndarray, offsets: np.ndarray, size: int, workers: int = 0, gpu_decode: bool = True):
        self.data, self.offsets, self.side = data, offsets, size
        self.workers = workers or min(16, os.cpu_count() or 1)
        self.gpu_decode = gpu_decode  # False: decode on CPU threads even for a CUDA device, then copy
        self._pool = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def encoded(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.data[self.offsets[i]:self.offsets[i + 1]]))

    def gather(self, idx: Index, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
        files = [self.encoded(i) for i in _positions(idx, len(self))]
        if not files:
            return torch.empty((0, 3, self.side, self.side), dtype=torch.uint8, device=device)
        mode = torchvision.io.ImageReadMode.RGB
        if torch.device(device).type == "cuda":
            if self.gpu_decode:
                return torch.stack(torchvision.io.decode_jpeg(files, mode=mode, device=device))
            return self._decode_cpu(files, mode).pin_memory().to(device, non_blocking=True)
        return self._decode_cpu(files, mode)

    def _decode_cpu(self, files: list[torch.Tensor], mode) -> torch.Tensor:
        chunks = [files[s:s + DECODE_CHUNK] for s in range(0, len(files), DECODE_CHUNK)]
        if len(chunks) == 1 or self.workers == 1:
            images = [img for chunk in chunks for img in torchvision.io.decode_jpeg(chunk, mode=mode)]
        else:  # torchvision's decoder releases the GIL: threads scale with cores
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers)
            images = [img for out in self._pool.map(lambda c: torchvision.io.decode_jpeg(c, mode=mode), chunks)
                      for img in out]
        return torch.stack(images)

    def __getstate__(self) -> dict:  # DataLoader workers and deepcopies get a fresh pool
        return {**self.__dict__, "_pool": None}


class ConcatImages(ImageStore):
    """Several stores read as one (train + val as `trainval`)."""

    def __init__(self, parts: Sequence[ImageStore]):
        self.parts, self.side = list(parts), parts[0].side
        self.starts = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def gather(self, idx: Index, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
        pos = _positions(idx, len(self))
        part = np.searchsorted(self.starts, pos, side="right") - 1
        out = torch.empty((len(pos), 3, self.side, self.side), dtype=torch.uint8, device=device)
        for p in np.unique(part):
            rows = np.flatnonzero(part == p)
            out[torch.from_numpy(rows).to(out.device)] = self.parts[p].gather(pos[rows] - self.starts[p], device)
        return out


def gather(images: Union[torch.Tensor, ImageStore], idx: Index,
           device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """uint8 (B, 3, S, S) for the selected images of a raw tensor or a compact store.

    Raw tensors are indexed where they are (the caller pins and copies them); stores decode on
    `device` directly (nvJPEG / a device-side resize)."""
    if isinstance(images, torch.Tensor):
        return images[idx]
    return images.gather(idx, device)


def concat_images(parts: Sequence[Union[torch.Tensor, ImageStore]]) -> Union[torch.Tensor, ImageStore]:
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(list(parts))
    return ConcatImages(parts)


def encode_jpeg(square: np.ndarray, quality: int) -> bytes:
    """uint8 (3, S, S) -> JPEG bytes, 4:4:4 (no chroma subsampling; see BENCHMARKS.md)."""
    buf = io.BytesIO()
    Image.fromarray(square.transpose(1, 2, 0)).save(buf, "JPEG", quality=quality, subsampling=0)
    return buf.getvalue()
