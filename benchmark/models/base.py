"""The foundation-model interface every strategy and evaluator relies on."""
from __future__ import annotations

import copy
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn


class FoundationModel(nn.Module):
    """An image encoder taking uint8 (or [0, 1] float) images and returning pooled features.

    Subclasses set `feature_dim`, `image_size`, `slice_layout` ("nchw" for CNNs, "nlc" for
    transformers) and implement `encode_image` on normalized float input and `slice_modules`,
    the modules whose outputs are LDIFS's feature slices.
    """

    feature_dim: int
    image_size: int
    slice_layout: str = "nchw"
    has_text: bool = False
    # Set by the runner for the device: bf16 autocast inside the encoder (features come out fp32),
    # and channels_last inputs for CNNs on CUDA.
    autocast_dtype: Optional[torch.dtype] = None
    channels_last: bool = False
    # True once parameter-efficient modules are installed (benchmark/models/adapters): only theirs train
    adapters_only: bool = False
    # Set by adapters that pick a task per batch (MoE-Adapters, DIKI): called at evaluation with the
    # normalized batch before it is encoded; returns the route, kept in `last_route` for the text side
    batch_router: Optional[Callable[["FoundationModel", torch.Tensor], Any]] = None
    last_route: Any = None

    def __init__(self, mean: Sequence[float], std: Sequence[float], freeze_bn: bool = True):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.freeze_bn = freeze_bn

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 -> float on the model's device; normalization happens here, not per sample."""
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        if self.batch_router is not None and not self.training:
            self.last_route = self.batch_router(self, x)
        if self.autocast_dtype is None:
            return self.encode_image(x)
        with torch.autocast(device_type=x.device.type, dtype=self.autocast_dtype):
            return self.encode_image(x).float()

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def slice_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def image_tower_copy(self) -> "FoundationModel":
        """A copy for image features alone (LDIFS's frozen reference); encoders with a text tower
        leave it out."""
        return copy.deepcopy(self)

    def towers(self) -> dict[str, str]:
        """Each tower's name prefix in `named_modules()` (where adapters may be installed)."""
        return {"image": ""}

    def train(self, mode: bool = True) -> "FoundationModel":
        super().train(mode)
        if mode and (self.freeze_bn or self.adapters_only):  # adapters leave the statistics frozen too
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self
