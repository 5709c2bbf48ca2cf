"""Model factory: a name and a pretrained tag/path -> FoundationModel (imports torch, timm and
open_clip; `benchmark.models.catalog` answers what can be asked without building one)."""
from __future__ import annotations

import os
from typing import Optional

import torch

from ..errors import CfbenchError
from .base import FoundationModel
from .catalog import default_image_size
from .clip import create_clip
from .efficientnet import EfficientNetLite0


def create_model(name: str, pretrained: Optional[str], image_size: Optional[int] = None,
                 freeze_bn: bool = True, quick_gelu: Optional[bool] = None) -> FoundationModel:
    """Never returns random weights unless pretrained is explicitly None (tests only)."""
    if name == "efficientnet_lite0":
        return EfficientNetLite0(pretrained=pretrained, image_size=image_size or default_image_size(name),
                                 freeze_bn=freeze_bn)
    model = create_clip(name, pretrained, freeze_bn=freeze_bn, quick_gelu=quick_gelu)
    if image_size and image_size != model.image_size:
        raise CfbenchError(f"{name} expects {model.image_size}px inputs, config asks for {image_size}")
    return model


def check_batchnorm(cfg, processes: int, encoder: Optional[FoundationModel] = None) -> None:
    """BatchNorm that trains (model.freeze_bn false) normalizes each batch by its own statistics:
    over N processes each rank would see its shard's, a different training step from one process
    (and other running statistics), so it is refused rather than silently changing the run.
    `encoder`: the built one (else the architecture is built without weights to look)."""
    if processes <= 1 or cfg.freeze_bn:
        return
    encoder = encoder or create_model(cfg.name, None, cfg.image_size, cfg.freeze_bn, cfg.quick_gelu)
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in encoder.modules()):
        raise CfbenchError(f"model.freeze_bn false trains {cfg.name}'s BatchNorm on batch statistics, which over "
                           f"{processes} processes would be each rank's shard, not the global batch (cfbench has "
                           "no SyncBatchNorm path); set model.freeze_bn: true or run in one process")


def build_model(cfg) -> FoundationModel:
    """The encoder a `ModelConfig` names. A local checkpoint that cannot be loaded (not a torch
    file, truncated, crafted, other weights) is one line: the file may come from anywhere."""
    local = cfg.pretrained is not None and os.path.isfile(cfg.pretrained)
    try:
        return create_model(cfg.name, cfg.pretrained, cfg.image_size, cfg.freeze_bn, cfg.quick_gelu)
    except CfbenchError:
        raise
    except Exception as err:  # unpickling and state-dict loading raise many types
        if not local:
            raise
        raise CfbenchError(f"model.pretrained {cfg.pretrained}: not a loadable {cfg.name} checkpoint "
                           f"({type(err).__name__} in torch.load / load_state_dict)") from None
