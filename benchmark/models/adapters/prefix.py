"""DIKI's prefix attention (Tang et al., ECCV 2024; github lloongx/DIKI at 8ef89e7, clip/attention.py):
per task, `length` key and value vectors in the projected key / value space of a block's attention,
attended by the block's queries through a separate softmax whose output is added to the normal
attention output before the frozen out_proj (attention.py:49-146):

    out = (softmax(Q K^T / sqrt(d) + M) V + w * softmax(Q P_k^T / sqrt(d)) P_v) W_o + b_o

P_k starts uniform in [-1, 1] and P_v at zero, so training starts from CLIP itself
(attention.py:168-173). w (the calibration weight) is 1 while training and the task is given;
at evaluation it is each sample's weight (image tower) or the batch's mean weight (text tower).
The pool is float32 here; the official keeps it, and the whole model, in float16.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .moe import BYPASS


class PrefixAttention(nn.Module):
    """A frozen nn.MultiheadAttention (batch-first, self-attention) with a prefix per task."""

    def __init__(self, base: nn.MultiheadAttention, tasks: int, length: int, generator: torch.Generator):
        super().__init__()
        if not base.batch_first or not base._qkv_same_embed_dim:
            raise ValueError("DIKI's prefixes need open_clip's batch-first attention with one packed projection")
        self.base = base
        pool = torch.zeros(tasks, 2, length, base.embed_dim)
        pool[:, 0].uniform_(-1, 1, generator=generator)
        self.prefix_pool = nn.Parameter(pool)
        self.task = BYPASS
        self.weight: Optional[Union[torch.Tensor, float]] = None  # None: 1 (training, or the task given)

    batch_first = property(lambda self: self.base.batch_first)  # what callers of the attention read
    in_proj_weight = property(lambda self: self.base.in_proj_weight)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False):
        b = self.base
        if self.task == BYPASS:
            return b(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                     attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        if key is not query or value is not query or key_padding_mask is not None:
            raise ValueError("DIKI's prefix attention is self-attention without a padding mask")
        n, length, width = query.shape
        heads = b.num_heads
        q, k, v = (t.view(n, length, heads, -1).transpose(1, 2)
                   for t in F.linear(query, b.in_proj_weight, b.in_proj_bias).chunk(3, dim=-1))
        mask = None
        if attn_mask is not None:  # open_clip's text mask: float -inf above the diagonal
            mask = attn_mask if attn_mask.is_floating_point() else \
                torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill_(attn_mask, float("-inf"))
        out = F.scaled_dot_product_attention(q, k, v, mask.to(q.dtype) if mask is not None else None)
        prefix = self.prefix_pool[self.task].to(q.dtype)  # (2, length, width)
        prefix_k, prefix_v = (p.view(1, -1, heads, width // heads).transpose(1, 2) for p in prefix)
        extra = F.scaled_dot_product_attention(q, prefix_k.expand(n, -1, -1, -1), prefix_v.expand(n, -1, -1, -1))
        if self.weight is not None:
            weight = self.weight
            extra = extra * (weight.view(n, 1, 1, 1).to(extra.dtype) if isinstance(weight, torch.Tensor) else weight)
        out = (out + extra).transpose(1, 2).reshape(n, length, width)
        return F.linear(out, b.out_proj.weight, b.out_proj.bias), None


def install_prefixes(blocks: nn.ModuleList, depth: int, tasks: int, length: int,
                     generator: torch.Generator) -> list[PrefixAttention]:
    """Prefix attention in the first `depth` blocks (all of them when there are fewer)."""
    layers = []
    for block in list(blocks)[:depth]:
        block.attn = PrefixAttention(block.attn, tasks, length, generator)
        layers.append(block.attn)
    return layers


def prefix_layers(module: nn.Module) -> list[PrefixAttention]:
    return [m for m in module.modules() if isinstance(m, PrefixAttention)]


def set_prefix_route(layers: list[PrefixAttention], task: int,
                     weight: Optional[Union[torch.Tensor, float]] = None) -> None:
    for layer in layers:
        layer.task, layer.weight = task, weight
