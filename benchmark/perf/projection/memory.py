"""Peak tensor memory of a piece of work, on any device, and its extension to a protocol's sizes.

A GPU reports its peak (`torch.cuda.max_memory_allocated`); a CPU reports nothing, so `PeakTensorBytes`
counts every storage the operations create while it is active -- parameters, gradients, optimizer
states, activations, the inputs' batches; views and in-place results share a storage and count once --
and subtracts a storage when it is freed. Neither counts a GPU's context, its libraries' workspaces or
its caching allocator's slack, which come on top.

Work whose tensors grow with a count (a training step's activations with its batch, a full-batch probe's
features and logits with its features) is measured at two small counts and extended as
fixed + count x per_item: `linear_peak`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary, weakref

import tasks
from tasks import TensorSplit

from ...config import RunConfig
from ...evaluation.probe import _fit_torch_lr
from ...models.base import FoundationModel
from .rates import train_rate

GIB = 2 ** 30


class PeakTensorBytes(TorchDispatchMode):
    """`with PeakTensorBytes() as counted: work()`, then `counted.peak`: the most bytes of storages
    created inside the block that were alive at once. Storages made before the block are not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes = WeakIdKeyDictionary()  # storage -> (bytes counted, the weakref that uncounts it)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = None
        for value in tree_leaves(out):
            if isinstance(value, torch.Tensor) and value.device.type != "meta":
                storage = value.untyped_storage()
                if storage not in self._sizes:
                    # a view of an input, or an input written in place: new only if no input holds it
                    inputs = inputs if inputs is not None else {t.untyped_storage().data_ptr() for t in
                                                                tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
                    if storage.data_ptr() in inputs and storage.nbytes():
                        continue
                self._count(storage)
        return out

    def _count(self, storage: torch.UntypedStorage) -> None:
        size = storage.nbytes()
        entry = self._sizes.get(storage)
        if entry is None:
            counted = [0]
            # the weakref lives as long as the storage (it is the dictionary's value) and uncounts it when freed
            entry = (counted, weakref.ref(storage, lambda _: self._uncount(counted)))
            self._sizes[storage] = entry
        counted = entry[0]
        if counted[0] != size:  # new, or resized in place
            self.live += size - counted[0]
            counted[0] = size
            self.peak = max(self.peak, self.live)

    def _uncount(self, counted: list) -> None:
        self.live -= counted[0]


@dataclass(frozen=True)
class LinearPeak:
    """Peak bytes as fixed + count x per_item, from two measured counts."""

    fixed: float
    per_item: float
    measured_at: tuple[int, int]

    def at(self, count: int) -> float:
        return self.fixed + count * self.per_item

    @classmethod
    def through(cls, counts: tuple[int, int], peaks: tuple[int, int]) -> "LinearPeak":
        (small, large), (low, high) = counts, peaks
        per_item = max(0.0, (high - low) / (large - small))
        return cls(fixed=max(0.0, low - small * per_item), per_item=per_item, measured_at=counts)


def peak_bytes(work: Callable[[], object], device: str) -> int:
    """Peak bytes of the tensors `work` creates: the CUDA allocator's peak on a GPU, counted storages elsewhere."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        work()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with PeakTensorBytes() as counted:
        work()
    return counted.peak


def linear_peak(work: Callable[[int], object], counts: tuple[int, int], device: str) -> LinearPeak:
    """`work(count)`'s peak at two counts, extended linearly (activations grow with the batch, a
    full-batch probe's features and logits with its features)."""
    return LinearPeak.through(counts, (peak_bytes(lambda: work(counts[0]), device),
                                       peak_bytes(lambda: work(counts[1]), device)))


PROBE_FEATURES = 4096  # the most features a probe's peak is measured at (its tensors are linear in the count)


def _gib(value: float) -> float:
    return value / GIB


def measure_memory(cfg: RunConfig, encoder: FoundationModel, combos: list[str], classes: int, samples: int,
                   device: str, probe_counts: dict[str, int]) -> dict:
    """The protocol's peak tensor memory: each strategy's training step at the protocol's batch (model,
    gradients, optimizer states, activations, the strategy's references), measured at the batch the
    rates use and half of it; and the official (full-batch) probe on the dataset whose features and
    logits are largest, measured at PROBE_FEATURES and half as many. What a training step holds whatever
    its batch (weights, gradients, optimizer state, the strategy's references: the extension's fixed
    part) stays on the device through the round after a task, on top of the probe's figure."""
    batch = cfg.train.batch_size
    measured = min(batch, samples) if device != "cuda" else batch
    counts = (max(1, measured // 2), max(2, measured))
    size = encoder.image_size

    def step(combo: str) -> Callable[[int], object]:
        def work(b: int) -> None:
            images = torch.randint(0, 256, (2 * b, 3, size, size), dtype=torch.uint8)
            train_rate(cfg, encoder, combo, TensorSplit(images, torch.arange(2 * b) % classes), classes, b, 1, device)
        return work

    train = {combo: linear_peak(step(combo), counts, device) for combo in combos}
    out = {"train_batch": batch, "train_measured_at": list(counts),
           "train_gib": {combo: _gib(peak.at(batch)) for combo, peak in train.items()},
           "resident_gib": _gib(max(peak.fixed for peak in train.values()))}
    if cfg.eval.probe == "official" and probe_counts:
        width = encoder.feature_dim
        name = max(probe_counts, key=lambda n: probe_counts[n] * (width + tasks.get_task(n).num_classes))
        n, k = probe_counts[name], tasks.get_task(name).num_classes
        peak = probe_peak(width, k, n, device)
        out["probe"] = {"dataset": name, "features": n, "width": width, "classes": k, "gib": _gib(peak.at(n)),
                        "measured_at": list(peak.measured_at)}
    return out


def probe_peak(width: int, classes: int, features: int, device: str) -> LinearPeak:
    """The official probe's full-batch fit (its copy of the features on the device, logits and their
    gradients, AdamW) at min(features, PROBE_FEATURES) features and half as many. The features are made
    before the count starts: a run extracts them to the host, and the fit copies them to the device."""
    m = min(features, PROBE_FEATURES)
    counts = (max(1, m // 2), max(2, m))
    peaks = []
    for count in counts:
        x = torch.randn(count, width, generator=torch.Generator().manual_seed(0))
        y = torch.arange(count) % classes
        peaks.append(peak_bytes(lambda: _fit_torch_lr(x, y, classes, 0.1, 2, device), device))
    return LinearPeak.through(counts, tuple(peaks))
