"""LoRA (Hu et al., 2022): a frozen layer plus a trainable low-rank update, scale * B A, B zero at
the start (the encoder is unchanged until it trains).

Why not peft: its Linear and Conv2d layers compute what LoraLinear and LoraConv2d do (equal outputs
on the same A and B: tests/test_lora.py), but its nn.MultiheadAttention layer -- the attention of
every open_clip ViT block -- adds B A into `in_proj_weight` before each forward and subtracts it
after, re-registering a new Parameter each call: the frozen weights drift by rounding (measured
on ViT-B-32: 130,001 of block 0's 1,769,472 in_proj weights changed after 20 no-grad forwards)
and anything holding the old Parameter loses it. LoraMultiheadAttention passes the updated
weights to torch's functional attention instead, and never touches the frozen ones.
"""
from __future__ import annotations

import math
import re
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class _LoraLayer(nn.Module):
    """The frozen layer (`base`), the scale alpha / rank, and the delta B A folded into `base`."""

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        self.base, self.rank, self.scale = base, rank, alpha / rank

    @torch.no_grad()
    def reset_adapter(self, generator: Optional[torch.Generator] = None) -> None:
        """A as nn.Linear's default (Kaiming-uniform, a = sqrt 5), B zero: peft's init_lora_weights=True.
        Drawn on the CPU from `generator`: every process of a run draws the same A."""
        for a, b in self.factors():
            a.copy_(nn.init.kaiming_uniform_(torch.empty(a.shape), a=math.sqrt(5), generator=generator))
            b.zero_()

    def factors(self) -> list[tuple[nn.Parameter, nn.Parameter]]:
        raise NotImplementedError

    @torch.no_grad()
    def merge(self, generator: Optional[torch.Generator] = None) -> None:
        """base <- base + scale * B A, then a fresh adapter (the next task's update starts at zero)."""
        for weight, (a, b) in zip(self.merged_weights(), self.factors()):
            weight.add_(self.delta(a, b, weight.shape).to(weight.dtype))
        self.reset_adapter(generator)

    def merged_weights(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def delta(self, a: torch.Tensor, b: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return (b.flatten(1) @ a.flatten(1)).reshape(shape) * self.scale


class _OneWeightLora(_LoraLayer):
    """A layer with one weight (Linear, Conv2d) and one pair of factors, lora_A and lora_B."""

    @property
    def weight(self) -> torch.Tensor:  # open_clip reads c_fc.weight.dtype for its cast dtype
        return self.base.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base.bias

    def factors(self):
        return [(self.lora_A, self.lora_B)]

    def merged_weights(self):
        return [self.base.weight]


class LoraLinear(_OneWeightLora):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__(base, rank, alpha)
        self.lora_A = nn.Parameter(base.weight.new_empty(rank, base.in_features))
        self.lora_B = nn.Parameter(base.weight.new_empty(base.out_features, rank))
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.dropout(x), self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
        return self.base(x) + update * self.scale


class LoraConv2d(_OneWeightLora):
    """A: a convolution like the base one into `rank` channels; B: 1x1 back (peft's Conv2d layout)."""

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float, dropout: float = 0.0):
        if base.groups != 1:
            raise ValueError("LoRA on a grouped (e.g. depthwise) convolution is not supported; leave it out of the "
                             "targets")
        super().__init__(base, rank, alpha)
        self.lora_A = nn.Parameter(base.weight.new_empty(rank, base.in_channels, *base.kernel_size))
        self.lora_B = nn.Parameter(base.weight.new_empty(base.out_channels, rank, 1, 1))
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.base
        low = F.conv2d(self.dropout(x), self.lora_A.to(x.dtype), None, b.stride, b.padding, b.dilation)
        return b(x) + F.conv2d(low, self.lora_B.to(x.dtype)) * self.scale


class LoraMultiheadAttention(_LoraLayer):
    """LoRA on the q, k, v projection (one A, B over the packed in_proj) and on out_proj, as peft's
    MultiheadAttention layer places them; the updated weights go to torch's functional attention."""

    def __init__(self, base: nn.MultiheadAttention, rank: int, alpha: float):
        if not base._qkv_same_embed_dim:
            raise ValueError("LoRA on attention with separate q, k, v projections is not supported")
        super().__init__(base, rank, alpha)
        e = base.embed_dim
        self.lora_A = nn.Parameter(base.in_proj_weight.new_empty(rank, e))
        self.lora_B = nn.Parameter(base.in_proj_weight.new_empty(3 * e, rank))
        self.lora_A_out = nn.Parameter(base.in_proj_weight.new_empty(rank, e))
        self.lora_B_out = nn.Parameter(base.in_proj_weight.new_empty(e, rank))

    # what callers of an nn.MultiheadAttention read
    batch_first = property(lambda self: self.base.batch_first)
    embed_dim = property(lambda self: self.base.embed_dim)
    num_heads = property(lambda self: self.base.num_heads)
    head_dim = property(lambda self: self.base.head_dim)
    in_proj_weight = property(lambda self: self.base.in_proj_weight)
    in_proj_bias = property(lambda self: self.base.in_proj_bias)
    out_proj = property(lambda self: self.base.out_proj)

    def factors(self):
        return [(self.lora_A, self.lora_B), (self.lora_A_out, self.lora_B_out)]

    def merged_weights(self):
        return [self.base.in_proj_weight, self.base.out_proj.weight]

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False):
        b = self.base
        in_w = b.in_proj_weight + self.delta(self.lora_A, self.lora_B, b.in_proj_weight.shape)
        out_w = b.out_proj.weight + self.delta(self.lora_A_out, self.lora_B_out, b.out_proj.weight.shape)
        if b.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        out, weights = F.multi_head_attention_forward(
            query, key, value, b.embed_dim, b.num_heads, in_w, b.in_proj_bias, b.bias_k, b.bias_v, b.add_zero_attn,
            b.dropout, out_w, b.out_proj.bias, training=self.training, key_padding_mask=key_padding_mask,
            need_weights=need_weights, attn_mask=attn_mask, average_attn_weights=average_attn_weights,
            is_causal=is_causal)
        return (out.transpose(0, 1) if b.batch_first else out), weights


def auto_targets(net: nn.Module, towers: tuple[str, ...]) -> list[str]:
    """What LoRA wraps by default: in a transformer, each block's attention and MLP projections;
    in a CNN, every ungrouped convolution and linear layer (depthwise ones have no low-rank form).
    `towers`: name prefixes to look under ("" for all)."""
    names = []
    for name, module in net.named_modules():
        if not any(name.startswith(t) for t in towers):
            continue
        if isinstance(module, nn.MultiheadAttention) or \
                (isinstance(module, nn.Linear) and re.search(r"\.mlp\.c_(fc|proj)$", name)):
            names.append(name)
        elif isinstance(module, nn.Conv2d) and module.groups == 1 and ".resblocks." not in name:
            names.append(name)
    if any(".resblocks." in n for n in names):  # a transformer: its blocks only (not the patch embedding)
        names = [n for n in names if ".resblocks." in n]
    return names


def install_lora(net: nn.Module, targets: list[str], rank: int, alpha: float, dropout: float = 0.0,
                 seed: int = 0) -> int:
    """Wraps each named submodule of `net` in place (A drawn from `seed`, B zero); returns the
    number of LoRA parameters."""
    generator = torch.Generator().manual_seed(seed)
    added = 0
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        base = getattr(parent, child)
        if isinstance(base, nn.MultiheadAttention):
            layer = LoraMultiheadAttention(base, rank, alpha)
        elif isinstance(base, nn.Conv2d):
            layer = LoraConv2d(base, rank, alpha, dropout)
        elif isinstance(base, nn.Linear):
            layer = LoraLinear(base, rank, alpha, dropout)
        else:
            raise ValueError(f"LoRA target {name} is a {type(base).__name__}; targets must be Linear, Conv2d or "
                             "MultiheadAttention")
        layer.reset_adapter(generator)
        setattr(parent, child, layer)
        added += sum(p.numel() for a_b in layer.factors() for p in a_b)
    return added


def lora_layers(net: nn.Module) -> list[_LoraLayer]:
    return [m for m in net.modules() if isinstance(m, _LoraLayer)]
