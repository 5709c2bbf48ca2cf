"""Minibatches straight from the cache, without a per-sample Dataset.__getitem__ and collate.

One indexing operation gathers a shuffled minibatch from the task's (memory-mapped) uint8 tensor,
pinned for asynchronous copies when training on CUDA; or one call decodes it from a compact
store on the training device, the next batch decoding in a thread while this one trains.
Under DDP each rank gathers its shard of every global batch (benchmark/distributed.py); every rank
draws the same shuffle. (No Avalanche import here: benchmark/perf/cache.py runs this loader on bare
GPU machines.)
"""
from __future__ import annotations

import itertools
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Optional, Union

import torch

from tasks.base import TensorSplit
from tasks.compact import gather

from ..distributed import World, shard, world


class TensorBatches:
    """Shuffled minibatches [x, y, index, task] of one split, one gather per batch.

    steps: a fixed number of batches (an iteration budget), passing over the split again with a
    fresh shuffle as often as needed; None = one pass. ranks: the process group's world (default
    the current one): each batch is this rank's shard of the global batch, whose size is
    `global_size` while the batch is being trained.
    """

    def __init__(self, split: TensorSplit, task: int, batch_size: int, shuffle: bool = True, pin: bool = False,
                 steps: Optional[int] = None, device: Union[str, torch.device] = "cpu", ranks: Optional[World] = None):
        self.split, self.task, self.batch_size, self.shuffle, self.pin = split, task, batch_size, shuffle, pin
        self.steps, self.device, self.ranks = steps, device, ranks or world()
        self.global_size = 0

    def __len__(self) -> int:
        return self.steps if self.steps is not None else math.ceil(len(self.split) / self.batch_size)

    def _one_pass(self) -> Iterator[torch.Tensor]:
        n = len(self.split)
        order = torch.randperm(n) if self.shuffle else torch.arange(n)  # global RNG: seeded per task
        for start in range(0, n, self.batch_size):
            yield order[start:start + self.batch_size]

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        for batch, total in self._batches():
            self.global_size = total
            yield batch

    def _batches(self) -> Iterator[tuple[list[torch.Tensor], int]]:
        passes = itertools.count() if self.steps is not None else range(1)
        indices = (idx for _ in passes for idx in self._one_pass())
        order = itertools.islice(indices, len(self))
        if isinstance(self.split.x, torch.Tensor):
            yield from ((self._batch(idx), len(idx)) for idx in order)
            return
        with ThreadPoolExecutor(1) as pool:  # compact store: decode batch k + 1 while batch k trains
            pending = None
            for idx in order:
                ahead = pool.submit(self._batch, idx), len(idx)
                if pending is not None:
                    yield pending[0].result(), pending[1]
                pending = ahead
            if pending is not None:
                yield pending[0].result(), pending[1]

    def _batch(self, idx: torch.Tensor) -> list[torch.Tensor]:
        if self.ranks.active:
            idx = idx[shard(len(idx), self.ranks)]
        batch = [gather(self.split.x, idx, self.device), self.split.y[idx], idx, torch.full((len(idx),), self.task)]
        return [b.pin_memory() if self.pin and b.device.type == "cpu" else b for b in batch]
