"""Where per-sample reference features are kept (LDIFS's slices, ZSCL's teacher features): RAM, or a
memory-mapped temporary file.

`allocate` picks the most precise dtype that fits the RAM budget (cache_dtype "auto": float32,
else float16 -- normalized features lie in [-1, 1], where float16 keeps 11 significant bits),
memory-maps float16 storage from a temporary file when even that exceeds RAM but fits the disk
budget, and gives up (None: compute the reference on the fly) beyond both.
"""
from __future__ import annotations

import logging
import tempfile
from typing import Optional

import numpy as np
import torch

log = logging.getLogger("cfbench")
DTYPES = ("auto", "float32", "float16", "bfloat16")


def _channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _memmapped(n: int, like: torch.Tensor) -> torch.Tensor:
    """float16 (n, *like.shape[1:]) backed by an anonymous temporary file, in like's memory format."""
    shape = (n, *like.shape[1:])
    order = (0, 2, 3, 1) if _channels_last(like) else tuple(range(len(shape)))
    stored = np.memmap(tempfile.TemporaryFile(prefix="cfbench-ldifs-"), dtype=np.float16, mode="w+",
                       shape=tuple(shape[i] for i in order))
    view = torch.from_numpy(stored)
    return view.permute(0, 3, 1, 2) if _channels_last(like) else view


def allocate(n: int, examples: list[torch.Tensor], dtype: str = "auto", ram_mb: float = 4096.0,
             disk_mb: float = 32768.0) -> Optional[list[torch.Tensor]]:
    """Storage for n samples of each example slice (batch axis first), or None if over budget."""
    if dtype not in DTYPES:
        raise ValueError(f"cache_dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    per_sample = sum(e[0].numel() for e in examples)
    candidates = [torch.float32, torch.float16] if dtype == "auto" else [getattr(torch, dtype)]
    for candidate in candidates:
        need = n * per_sample * torch.finfo(candidate).bits / 8 / 2**20
        if need <= ram_mb:
            fmt = [torch.channels_last if _channels_last(e) else torch.contiguous_format for e in examples]
            return [torch.empty((n, *e.shape[1:]), dtype=candidate).to(memory_format=f) for e, f in zip(examples, fmt)]
    need = n * per_sample * 2 / 2**20
    if need <= disk_mb:
        log.info("reference cache: %.0f MB float16, memory-mapped from a temporary file", need)
        return [_memmapped(n, e) for e in examples]
    log.info("reference cache would need %.0f MB > budgets (RAM %.0f, disk %.0f MB): "
             "the reference runs on every batch", need, ram_mb, disk_mb)
    return None
