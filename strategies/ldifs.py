"""LDIFS: l2 distance in feature space to a frozen reference encoder (Mukhoti et al., TMLR 2024).

Loss = CE + alpha * LDIFS. Slices come from `encoder.slice_modules()` (ViT: ln_pre and the
residual stream after blocks D/4, D/2, 3D/4, D; CNN: stem and each stage). The official code
normalizes (N, L, C) slices along dim 1, the token axis; `normalize="channel"` uses C instead.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Iterator, Optional

import torch
from avalanche.core import SupervisedPlugin
from torch import nn

EPS = 1e-10


def _normalized(x: torch.Tensor, layout: str, normalize: str) -> torch.Tensor:
    if layout == "nlc":
        dim = 1 if normalize == "official" else 2
    elif layout == "nchw":
        dim = 1  # channels, for both modes
    else:
        raise ValueError(f"unknown slice layout {layout!r}")
    x = x.float()
    return x / (x.norm(dim=dim, keepdim=True) + EPS)


def ldifs_distance(current: list[torch.Tensor], reference: list[torch.Tensor], layout: str,
                   normalize: str = "official") -> torch.Tensor:
    """Mean over slices, then over the batch, of the per-sample mean squared difference of
    normalized features (for nlc: mean over C, then over L; for nchw: over C, H, W)."""
    if len(current) != len(reference) or not current:
        raise ValueError(f"got {len(current)} current and {len(reference)} reference slices")
    per_slice = []
    for cur, ref in zip(current, reference):
        diff = (_normalized(cur, layout, normalize) - _normalized(ref, layout, normalize)) ** 2
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
    """

    checkpoint_attrs = ("reference_encoder",)  # what --resume restores

    def __init__(self, alpha: float = 10.0, reference: str = "previous", normalize: str = "official"):
        super().__init__()
        if reference not in ("previous", "pretrained"):
            raise ValueError(f"reference must be previous or pretrained, not {reference!r}")
        if normalize not in ("official", "channel"):
            raise ValueError(f"normalize must be official or channel, not {normalize!r}")
        self.alpha, self.reference, self.normalize = float(alpha), reference, normalize
        self.reference_encoder: Optional[nn.Module] = None
        self.last_penalty: Optional[torch.Tensor] = None
        self._captured: list[torch.Tensor] = []
        self._capturing = False
        self._handles: list = []

    def before_training_exp(self, strategy, **kwargs):
        encoder = strategy.model.encoder
        if self.reference == "previous" or self.reference_encoder is None:
            self.reference_encoder = copy.deepcopy(encoder).eval().requires_grad_(False)
        self._handles = [m.register_forward_hook(self._hook) for m in encoder.slice_modules()]

    def _hook(self, _module, _inputs, output):
        if self._capturing:
            self._captured.append(_slice_output(output))

    def before_forward(self, strategy, **kwargs):
        self._captured = []
        self._capturing = True

    def after_forward(self, strategy, **kwargs):
        self._capturing = False

    def before_backward(self, strategy, **kwargs):
        ref_encoder = self.reference_encoder
        with torch.no_grad(), capture_slices(ref_encoder.slice_modules()) as ref_slices:
            ref_encoder(strategy.mb_x)
        penalty = ldifs_distance(self._captured, ref_slices, strategy.model.encoder.slice_layout, self.normalize)
        self.last_penalty = penalty.detach()
        strategy.loss += self.alpha * penalty
        self._captured = []

    def after_training_exp(self, strategy, **kwargs):
        for h in self._handles:
            h.remove()
        self._handles = []
