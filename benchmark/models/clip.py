"""open_clip CLIP image towers (ViT or ModifiedResNet) behind the FoundationModel interface."""
from __future__ import annotations

import copy
import os
from typing import Optional

import torch
from torch import nn

from ..errors import CfbenchError
from .adapters import is_adapter_parameter
from .base import FoundationModel
from .catalog import CONFIGS_ENV
from .weights import require_cached


def open_clip_with_configs():
    """open_clip, with the model configs (JSON, open_clip's format) of the file or folder that
    $CFBENCH_OPEN_CLIP_CONFIGS names registered: an architecture of one's own by name, in every
    process of a run (torchrun's ranks start afresh)."""
    import open_clip

    extra = os.environ.get(CONFIGS_ENV)
    if extra:
        if not os.path.exists(extra):
            raise CfbenchError(f"{CONFIGS_ENV}={extra}: no such file or folder of open_clip model configs")
        open_clip.add_model_config(extra)
    return open_clip


class CLIPModel(FoundationModel):
    has_text = True

    def __init__(self, clip: nn.Module, tokenizer=None, freeze_bn: bool = True):
        visual = clip.visual
        cfg = getattr(visual, "preprocess_cfg", {}) or {}
        super().__init__(mean=cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)),
                         std=cfg.get("std", (0.26862954, 0.26130258, 0.27577711)), freeze_bn=freeze_bn)
        self.clip = clip
        if tokenizer is None:
            import open_clip

            tokenizer = open_clip.tokenize  # open_clip's default BPE tokenizer, context length 77
        self.tokenizer = tokenizer
        size = getattr(visual, "image_size", 224)
        self.image_size = size[0] if isinstance(size, (tuple, list)) else int(size)
        self.feature_dim = int(getattr(visual, "output_dim"))
        self.slice_layout = "nlc" if hasattr(visual, "transformer") else "nchw"

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(x)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_text(tokens)

    @property
    def logit_scale(self) -> float:
        return float(self.clip.logit_scale.detach().exp())

    def text_parameters(self) -> list[nn.Parameter]:
        """Everything outside the image tower: text transformer, embeddings, projection, logit_scale."""
        visual = {id(p) for p in self.clip.visual.parameters()}
        return [p for p in self.clip.parameters() if id(p) not in visual]

    def set_text_trainable(self, trainable: bool) -> None:
        """Frozen (False), the text side stays bit-identical: no gradients, so no optimizer, penalty
        or decay touches it (the official LDIFS code deletes the text transformer from the trained
        encoder, modeling.py:88-89). logit_scale never trains (ZSCL excludes it too, finetune.py:82)."""
        text = {id(p) for p in self.text_parameters()}
        for name, p in self.named_parameters():
            if id(p) in text:  # with adapters installed, only theirs train (benchmark/models/adapters)
                p.requires_grad_(trainable and (not self.adapters_only or is_adapter_parameter(name)))
        self.clip.logit_scale.requires_grad_(False)

    def towers(self) -> dict[str, str]:
        return {"image": "clip.visual.", "text": "clip.transformer."}

    def image_tower_copy(self) -> "CLIPModel":
        """A copy with the image tower only: the text transformer, embeddings, projection, logit_scale
        and tokenizer are never copied (left None), so a ViT-B/32 reference holds 88 M parameters, not 151 M."""
        visual = self.clip.visual
        text_parts = [m for m in self.clip.children() if m is not visual]
        text_parts += [t for _, t in self.clip.named_parameters(recurse=False)]
        text_parts += [t for _, t in self.clip.named_buffers(recurse=False)]
        tower = copy.deepcopy(self, memo={id(part): None for part in [*text_parts, self.tokenizer]})
        tower.has_text = False
        tower.image_tower_only = True
        return tower

    def slice_modules(self) -> list[nn.Module]:
        """ViT: ln_pre output and the residual stream after blocks D/4, D/2, 3D/4, D (LDIFS's
        five slices, for any depth). ModifiedResNet: stem output and each of the four stages."""
        visual = self.clip.visual
        if hasattr(visual, "transformer"):
            blocks = visual.transformer.resblocks
            depth = len(blocks)
            picks = sorted({max(1, round(depth * k / 4)) for k in (1, 2, 3, 4)})
            return [visual.ln_pre, *(blocks[i - 1] for i in picks)]
        return [visual.avgpool, visual.layer1, visual.layer2, visual.layer3, visual.layer4]


def wants_quick_gelu(name: str, pretrained: Optional[str], quick_gelu: Optional[bool] = None) -> bool:
    """QuickGELU as the weights were trained: an explicit choice wins; else open_clip's metadata of
    the pretrained tag (`openai` weights: True). open_clip 3 builds `ViT-B-32` with nn.GELU even for
    `openai` and only warns; a local checkpoint path carries no such metadata (default False)."""
    import open_clip

    if quick_gelu is not None:
        return quick_gelu
    if name.endswith("-quickgelu"):
        return True
    if pretrained and not os.path.exists(pretrained):
        return bool(open_clip.get_pretrained_cfg(name, pretrained).get("quick_gelu", False))
    return False


def create_clip(name: str, pretrained: Optional[str], freeze_bn: bool = True,
                quick_gelu: Optional[bool] = None) -> CLIPModel:
    """An open_clip model with `pretrained` weights: a local checkpoint, or a tag whose weights are
    cached on this machine (`cfbench data download --model`). A tag is loaded from its cached file
    with the tag's preprocessing, so no run ever waits on hub retries; missing weights are one line."""
    open_clip = open_clip_with_configs()

    if name not in open_clip.list_models():
        raise CfbenchError(f"unknown open_clip model {name!r}; see `cfbench list models`")
    checkpoint, preprocess = pretrained or None, None
    if pretrained and not os.path.exists(pretrained):
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            raise CfbenchError(f"{name}: pretrained must be a local checkpoint path or one of {tags}")
        checkpoint, preprocess = require_cached(name, pretrained), open_clip.get_pretrained_cfg(name, pretrained)
    try:
        clip = open_clip.create_model(name, pretrained=checkpoint, force_preprocess_cfg=preprocess,
                                      force_quick_gelu=wants_quick_gelu(name, pretrained, quick_gelu))
    except Exception as err:  # a corrupt or mismatched checkpoint surfaces as many exception types
        raise CfbenchError(f"could not load {name} weights {pretrained!r} from {checkpoint}: {err}") from None
    return CLIPModel(clip, open_clip.get_tokenizer(name), freeze_bn=freeze_bn)
