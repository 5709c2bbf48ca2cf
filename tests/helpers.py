"""Tiny random-weight models for tests only (never used as a pretrained default)."""
import open_clip
import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg

from benchmark.models.clip import CLIPModel


def tiny_clip_vit(layers: int = 12) -> CLIPModel:
    torch.manual_seed(0)
    clip = open_clip.CLIP(embed_dim=16,
                          vision_cfg=CLIPVisionCfg(layers=layers, width=32, head_width=16, patch_size=8, image_size=32),
                          text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))
    return CLIPModel(clip)


def tiny_clip_rn() -> CLIPModel:
    torch.manual_seed(0)
    clip = open_clip.CLIP(embed_dim=16,
                          vision_cfg=CLIPVisionCfg(layers=(1, 1, 1, 1), width=8, image_size=32),
                          text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))
    return CLIPModel(clip)
