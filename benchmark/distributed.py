"""One run over several processes: torch.distributed data parallelism (torchrun, `cfbench run --nproc`).

Every rank runs the whole program on the same seeds, so every random draw (the shuffle, the crop
boxes, ZSCL's reference batches) is the same on every rank, as it is in one process. Each global
batch is then split by position: rank r takes samples r, r + N, r + 2N, ... (`shard`), so a batch
that does not divide by N gives the first B mod N ranks one sample more. Every loss that is a mean
over the batch is multiplied by `shard_weight` = N * n_r / B before DDP averages the gradients over
the N ranks: the average is then the gradient of the mean over the global batch, for any B and N.
Penalties of the parameters alone (L2SP, EWC, ZSCL's l2) are added unweighted on every rank.

Without a process group (one process) every function here is the identity of one rank.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, TypeVar

import torch
import torch.distributed as dist

from .errors import CfbenchError


T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def writer(self) -> bool:
        """Rank 0 alone writes the run folder, checkpoints and trackers."""
        return self.rank == 0


def world() -> World:
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def launched() -> bool:
    """Started by torchrun (or `cfbench run --nproc`) with more than one process."""
    return rank_environment()["WORLD_SIZE"] > 1


def rank_environment() -> dict[str, int]:
    """torchrun's rank variables, checked (hand-set ones included): one line naming the first that
    is missing or out of range, instead of a traceback from inside the process group's set-up."""
    env = os.environ

    def number(name: str, least: int, most: int) -> int:
        text = env.get(name)
        if text is None:
            raise CfbenchError(f"${name} is not set but $WORLD_SIZE is {env['WORLD_SIZE']}: start the ranks with "
                               "torchrun or `cfbench run --nproc N`, which set every rank variable")
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not least <= value <= most:
            raise CfbenchError(f"${name}={text[:40]!r} must be a whole number from {least} to {most}")
        return value

    if "WORLD_SIZE" not in env:
        return {"WORLD_SIZE": 1, "RANK": 0, "LOCAL_RANK": 0}
    size = number("WORLD_SIZE", 1, 1 << 20)
    if size == 1:
        return {"WORLD_SIZE": 1, "RANK": 0, "LOCAL_RANK": 0}
    found = {"WORLD_SIZE": size, "RANK": number("RANK", 0, size - 1),
             "LOCAL_WORLD_SIZE": number("LOCAL_WORLD_SIZE", 1, size)}
    found["LOCAL_RANK"] = number("LOCAL_RANK", 0, found["LOCAL_WORLD_SIZE"] - 1)
    number("MASTER_PORT", 1, 65535)
    if not env.get("MASTER_ADDR"):
        raise CfbenchError(f"$MASTER_ADDR is not set but $WORLD_SIZE is {size}: start the ranks with torchrun or "
                           "`cfbench run --nproc N`")
    return found


def init_from_env(device: str) -> World:
    """Join the process group torchrun describes in the environment (NCCL on GPUs, gloo on CPU);
    one process stays without one."""
    if not launched() or dist.is_initialized():
        return world()
    local_rank = rank_environment()["LOCAL_RANK"]
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return world()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(n: int, w: Optional[World] = None) -> slice:
    """This rank's positions in a global batch of n: r, r + N, r + 2N, ... A rank beyond a batch
    smaller than N (an epoch's last) takes position 0 with weight 0: DDP needs every rank's forward
    and backward, and a model cannot run on no sample."""
    w = w or world()
    return slice(w.rank, n, w.size) if w.rank < n else slice(0, 1)


def shard_weight(n: int, w: Optional[World] = None) -> float:
    """N * n_r / n: the factor that turns this rank's batch mean into its part of the global mean
    under DDP's average (1.0 in one process and whenever n divides by N; 0 for a stand-in sample)."""
    w = w or world()
    return w.size * len(range(w.rank, n, w.size)) / n if n else 0.0


def barrier() -> None:
    if world().active:
        dist.barrier()


def broadcast(value: Any, src: int = 0) -> Any:
    """Rank `src`'s `value` on every rank (any picklable object; tensors on the CPU)."""
    if not world().active:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def once(compute: Callable[[], T], owner: int = 0) -> T:
    """`compute()` run by rank `owner` alone, its value (picklable, tensors on the CPU) on every
    rank: work whose result every rank needs but that one process does once (a probe's fit)."""
    w = world()
    if not w.active:
        return compute()
    return broadcast(compute() if w.rank == owner % w.size else None, src=owner % w.size)


def share_out(count: int, compute: Callable[[int], T], keep: Callable[[int, T], None]) -> None:
    """Chunks 0..count-1 each computed once, chunk k by rank k mod N, and `keep(k, value)` called
    with every chunk on every rank, N chunks at a time (memory: N chunks, not the whole)."""
    w = world()
    for first in range(0, count, w.size):
        k = first + w.rank
        values = gather_objects(compute(k) if k < count else None)
        for j, value in enumerate(values):
            if first + j < count:
                keep(first + j, value)


def gather_objects(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank."""
    w = world()
    if not w.active:
        return [value]
    out: list[Any] = [None] * w.size
    dist.all_gather_object(out, value)
    return out


def all_reduce_sum(tensors: list[torch.Tensor]) -> None:
    """In place: each tensor becomes its sum over the ranks."""
    if not world().active:
        return
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)


def owned_chunks(count: int, w: Optional[World] = None) -> range:
    """The chunks (of a fixed-size chunking, e.g. evaluation batches) this rank computes: k = r mod N.
    Whole chunks keep each sample's batch the same as in one process, so results are bit-identical."""
    w = w or world()
    return range(w.rank, count, w.size)


def gather_chunks(mine: dict[int, torch.Tensor], count: int) -> list[torch.Tensor]:
    """All `count` chunks in order, from each rank's {chunk index: tensor} (`owned_chunks`)."""
    if not world().active:
        return [mine[k] for k in range(count)]
    merged: dict[int, torch.Tensor] = {}
    for part in gather_objects(mine):
        merged.update(part)
    return [merged[k] for k in range(count)]
