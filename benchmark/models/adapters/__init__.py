"""Parameter-efficient modules installed into a built encoder (LoRA, MoE-Adapters' routed experts,
DIKI's prefix attention). Each module keeps the layer it wraps, frozen, and names its own
parameters with a prefix of ADAPTER_PREFIXES, so the encoder can tell what may train."""
from __future__ import annotations

import torch
from torch import nn

ADAPTER_PREFIXES = ("lora_", "moe_", "prefix_")


def is_adapter_parameter(name: str) -> bool:
    """Whether a parameter name (as in `named_parameters()`) belongs to an installed adapter."""
    return any(part.startswith(ADAPTER_PREFIXES) for part in name.split("."))


def train_adapters_only(module: nn.Module) -> list[str]:
    """Every parameter frozen but the adapters'; returns the names of those that train."""
    trainable = []
    for name, p in module.named_parameters():
        p.requires_grad_(is_adapter_parameter(name))
        if p.requires_grad:
            trainable.append(name)
    return trainable


def count_parameters(module: nn.Module, trainable: bool) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad == trainable)


def vit_towers(encoder, what: str) -> tuple[nn.Module, nn.Module]:
    """(image transformer, text transformer) of an open_clip ViT CLIP encoder, whose blocks adapters go
    into; a ValueError naming `what` goes into them for any other encoder."""
    clip = getattr(encoder, "clip", None)
    if clip is None or not hasattr(clip.visual, "transformer") or not hasattr(clip, "transformer"):
        raise ValueError(f"needs an open_clip ViT CLIP ({what} go into both towers' transformer blocks)")
    return clip.visual.transformer, clip.transformer


class FrozenImageFeatures(nn.Module):
    """A frozen copy of the pretrained image tower (taken before adapters go in): what MoE-Adapters'
    `extractor: clip` and DIKI's task identification read."""

    def __init__(self, tower: nn.Module):
        super().__init__()
        self.tower = tower.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "FrozenImageFeatures":
        return super().train(False)  # always evaluating

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.tower.encode_image(images)


__all__ = ["ADAPTER_PREFIXES", "is_adapter_parameter", "train_adapters_only", "count_parameters",
           "vit_towers", "FrozenImageFeatures"]
