"""LDIFS: l2 distance in feature space to a frozen reference encoder (Mukhoti et al., TMLR 2024).

Loss = CE + alpha * LDIFS. Slices come from `encoder.slice_modules()` (ViT: ln_pre and the
residual stream after blocks D/4, D/2, 3D/4, D; CNN: stem and each stage). The official code
normalizes (N, L, C) slices along dim 1, the token axis; `normalize="channel"` uses C instead.

Inputs are deterministic (no random augmentation), so when batches carry sample indices
(cfbench's datasets yield (x, y, index, task)) the reference encoder's normalized slices are
computed once per task in one no-grad pass and looked up every step, instead of running the
frozen encoder on every batch of every epoch.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from typing import Iterator, Optional

import torch
from avalanche.core import SupervisedPlugin
from torch import nn
from torch.utils.data import DataLoader

EPS = 1e-10
log = logging.getLogger("cfbench")


def normalize_slice(x: torch.Tensor, layout: str, normalize: str = "official") -> torch.Tensor:
    if layout == "nlc":
        dim = 1 if normalize == "official" else 2
    elif layout == "nchw":
        dim = 1  # channels, for both modes
    else:
        raise ValueError(f"unknown slice layout {layout!r}")
    x = x.float()
    return x / (x.norm(dim=dim, keepdim=True) + EPS)


def ldifs_distance(current: list[torch.Tensor], reference: list[torch.Tensor], layout: str,
                   normalize: str = "official", reference_normalized: bool = False) -> torch.Tensor:
    """Mean over slices, then over the batch, of the per-sample mean squared difference of
    normalized features (for nlc: mean over C, then over L; for nchw: over C, H, W)."""
    if len(current) != len(reference) or not current:
        raise ValueError(f"got {len(current)} current and {len(reference)} reference slices")
    per_slice = []
    for cur, ref in zip(current, reference):
        ref = ref.float() if reference_normalized else normalize_slice(ref, layout, normalize)
        diff = (normalize_slice(cur, layout, normalize) - ref) ** 2
        per_slice.append(diff.flatten(1).mean(dim=1))  # equal-size axes: mean over C then L == flat mean
    return torch.stack(per_slice, dim=0).mean(dim=0).mean()


def _slice_output(output):
    return output[0] if isinstance(output, tuple) else output


@contextlib.contextmanager
def capture_slices(modules: list[nn.Module]) -> Iterator[list[torch.Tensor]]:
    """Collect the outputs of `modules`, in order, during the forwards inside the block."""
    outputs: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda _m, _i, out: outputs.append(_slice_output(out))) for m in modules]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


class LDIFSPlugin(SupervisedPlugin):
    """Adds alpha * LDIFS(f_theta(x), f_ref(x)) on each training batch to `strategy.loss`.

    The model must expose `.encoder`, a FoundationModel (slice_modules, slice_layout).
    reference: "previous" = the encoder as it was before the current task (official code's
    choice in sequences), "pretrained" = the encoder before the first task.
    cache: reuse per-sample reference slices (needs sample indices in the batch) within
    cache_budget_mb, stored as cache_dtype; otherwise the reference runs on every batch.
    """

    checkpoint_attrs = ("reference_encoder",)  # what --resume restores

    def __init__(self, alpha: float = 10.0, reference: str = "previous", normalize: str = "official",
                 cache: bool = True, cache_budget_mb: float = 4096.0, cache_dtype: str = "float32"):
        super().__init__()
        if reference not in ("previous", "pretrained"):
            raise ValueError(f"reference must be previous or pretrained, not {reference!r}")
        if normalize not in ("official", "channel"):
            raise ValueError(f"normalize must be official or channel, not {normalize!r}")
        if cache_dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"cache_dtype must be float32, float16 or bfloat16, not {cache_dtype!r}")
        self.alpha, self.reference, self.normalize = float(alpha), reference, normalize
        self.cache, self.cache_budget_mb, self.cache_dtype = cache, float(cache_budget_mb), getattr(torch, cache_dtype)
        self.reference_encoder: Optional[nn.Module] = None
        self.last_penalty: Optional[torch.Tensor] = None
        self.reference_forwards = 0  # frozen-encoder calls made inside training steps
        self._cached: Optional[list[torch.Tensor]] = None
        self._captured: list[torch.Tensor] = []
        self._capturing = False
        self._handles: list = []

    def before_training_exp(self, strategy, **kwargs):
        encoder = strategy.model.encoder
        if self.reference == "previous" or self.reference_encoder is None:
            self.reference_encoder = copy.deepcopy(encoder).eval().requires_grad_(False)
        self._cached = self._build_cache(strategy) if self.cache else None
        self._handles = [m.register_forward_hook(self._hook) for m in encoder.slice_modules()]

    @torch.no_grad()
    def _reference_slices(self, x: torch.Tensor) -> list[torch.Tensor]:
        with capture_slices(self.reference_encoder.slice_modules()) as slices:
            self.reference_encoder(x)
        return slices

    def _build_cache(self, strategy) -> Optional[list[torch.Tensor]]:
        dataset = strategy.experience.dataset
        if len(dataset) == 0 or len(dataset[0]) < 4:
            return None  # batches carry no sample index: compute on the fly
        layout = strategy.model.encoder.slice_layout
        x0 = dataset[0][0].unsqueeze(0).to(strategy.device)
        shapes = [s.shape[1:] for s in self._reference_slices(x0)]
        itemsize = torch.finfo(self.cache_dtype).bits // 8
        need_mb = len(dataset) * sum(s.numel() for s in shapes) * itemsize / 2**20
        if need_mb > self.cache_budget_mb:
            log.info("LDIFS reference cache needs %.0f MB > budget %.0f MB: computing on the fly",
                     need_mb, self.cache_budget_mb)
            return None
        cache = [torch.empty((len(dataset), *s), dtype=self.cache_dtype) for s in shapes]
        # a private generator: building the cache must not shift the training shuffle's RNG
        loader = DataLoader(dataset, batch_size=max(256, strategy.train_mb_size), shuffle=False,
                            generator=torch.Generator())
        for batch in loader:
            x, index = batch[0].to(strategy.device), batch[2]
            for store, ref in zip(cache, self._reference_slices(x)):
                store[index] = normalize_slice(ref, layout, self.normalize).to("cpu", self.cache_dtype)
        return cache

    def _hook(self, _module, _inputs, output):
        if self._capturing:
            self._captured.append(_slice_output(output))

    def before_forward(self, strategy, **kwargs):
        self._captured = []
        self._capturing = True

    def after_forward(self, strategy, **kwargs):
        self._capturing = False

    def before_backward(self, strategy, **kwargs):
        layout = strategy.model.encoder.slice_layout
        if self._cached is not None and len(strategy.mbatch) >= 4:
            index = strategy.mbatch[2].cpu()
            device = self._captured[0].device
            reference = [c[index].to(device, non_blocking=True) for c in self._cached]
            penalty = ldifs_distance(self._captured, reference, layout, self.normalize, reference_normalized=True)
        else:
            self.reference_forwards += 1
            penalty = ldifs_distance(self._captured, self._reference_slices(strategy.mb_x), layout, self.normalize)
        self.last_penalty = penalty.detach()
        strategy.loss += self.alpha * penalty
        self._captured = []

    def after_training_exp(self, strategy, **kwargs):
        for h in self._handles:
            h.remove()
        self._handles = []
        self._cached = None
