"""MoE-Adapters (Yu et al., CVPR 2024): in every block of both CLIP towers, a mixture of adapter
experts beside the MLP, chosen per sample by the current task's noisy top-k router.

As the official mtil/ code at 4572d97 (the CVPR version; later commits are "MoE-Adapters++"):
- block: x <- x + MLP(LN2(x)) + sum_e gate_e(x) * expert_e(x): the experts read the residual stream
  after attention, un-normalised (clip/model.py:496, :511);
- expert: up(dropout_0.1(relu(down(x)))) * 0.1, down 64 wide, Kaiming-uniform (a = sqrt 5) down
  weight, zero up weight and biases (clip/adapter.py:33-69, model.py:339-345);
- router: per task a gate and a noise matrix (width x experts), both zero at the start (model.py:
  336-338), fed with token 0 of the residual (:474); noisy top-k gating (:429-460): logits =
  x W_g + randn * (softplus(x W_n) + 0.01) while training, x W_g at evaluation; the gates are the
  softmax over the k largest logits, scattered (:449-455). The balancing loss the code computes is
  never added to the objective (:481-483), so it is left out;
- dispatch and combine (:16-127): each expert runs on the samples routed to it, outputs times
  gates summed in float32 by index_add;
- usage: every training forward adds, per expert, the samples routed to it (:486-492); after a task
  the `freeze_top` most used experts of each block are frozen for good (finetune.py:195-220).
Route -1 bypasses the experts (pure CLIP: model.py:471-473). The open_clip block is kept whole inside
MoEBlock, which repeats its three-line forward with the experts' sum added where the official adds it.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

BYPASS = -1  # the route of pure CLIP (the selector found no task)


class Expert(nn.Module):
    def __init__(self, width: int, bottleneck: int = 64, dropout: float = 0.1, scale: float = 0.1):
        super().__init__()
        self.down, self.up = nn.Linear(width, bottleneck), nn.Linear(bottleneck, width)
        self.dropout, self.scale = dropout, scale

    @torch.no_grad()
    def reset(self, generator: Optional[torch.Generator] = None) -> None:
        self.down.weight.copy_(nn.init.kaiming_uniform_(torch.empty(self.down.weight.shape), a=math.sqrt(5),
                                                        generator=generator))
        for t in (self.down.bias, self.up.weight, self.up.bias):
            t.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(F.dropout(F.relu(self.down(x)), p=self.dropout, training=self.training)) * self.scale


def noisy_top_k_gates(x: torch.Tensor, w_gate: torch.Tensor, w_noise: torch.Tensor, k: int, noisy: bool,
                      noise_epsilon: float = 1e-2) -> torch.Tensor:
    """(batch, experts) gates: softmax over the k largest (noisy, while training) logits, zero elsewhere."""
    clean = x @ w_gate
    logits = clean + torch.randn_like(clean) * (F.softplus(x @ w_noise) + noise_epsilon) if noisy else clean
    top_logits, top_index = logits.topk(min(k + 1, logits.shape[1]), dim=1)
    return torch.zeros_like(logits).scatter(1, top_index[:, :k], F.softmax(top_logits[:, :k], dim=1))


def dispatch_combine(x: torch.Tensor, gates: torch.Tensor, experts: nn.ModuleList) -> torch.Tensor:
    """sum_e gates[b, e] * expert_e(x[b]), each expert on its samples only, accumulated in float32.
    Each expert's samples come in the order the official SparseDispatcher leaves them (clip/model.py:58,
    :67: the rows of nonzero(gates) reordered by sort(0)'s permutation of the expert column, not batch
    order): the experts' dropout draws then fall on the same samples as there."""
    pairs = torch.nonzero(gates)
    rows = pairs[pairs.sort(0).indices[:, 1], 0]
    sizes = (gates > 0).sum(0).tolist()
    outputs = []
    for e, (expert, index) in enumerate(zip(experts, rows.split(sizes))):  # every expert runs, on none too
        out = expert(x[index])
        if len(index):
            outputs.append(out * gates[index, e].view(-1, *([1] * (x.dim() - 1))))
    combined = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    if not outputs:
        return combined
    return combined.index_add(0, rows, torch.cat(outputs).float())


class MoELayer(nn.Module):
    """The experts and per-task routers of one block (installed around it by `install_moe`)."""

    def __init__(self, width: int, tasks: int, experts: int = 22, top_k: int = 2, bottleneck: int = 64,
                 dropout: float = 0.1, scale: float = 0.1, noise_epsilon: float = 1e-2):
        super().__init__()
        self.moe_experts = nn.ModuleList(Expert(width, bottleneck, dropout, scale) for _ in range(experts))
        self.moe_gates = nn.ParameterList(nn.Parameter(torch.zeros(width, experts)) for _ in range(tasks))
        self.moe_noise = nn.ParameterList(nn.Parameter(torch.zeros(width, experts)) for _ in range(tasks))
        self.register_buffer("frozen", torch.zeros(experts, dtype=torch.bool))  # kept in checkpoints
        self.usage = torch.zeros(experts, dtype=torch.long)  # this task's training routes (not saved)
        self.top_k, self.noise_epsilon = top_k, noise_epsilon
        self.task = BYPASS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: the residual stream (batch, tokens, width) after attention; returns the experts' sum."""
        gates = noisy_top_k_gates(x[:, 0, :], self.moe_gates[self.task], self.moe_noise[self.task], self.top_k,
                                  noisy=self.training, noise_epsilon=self.noise_epsilon)
        if self.training:
            self.usage += (gates > 0).sum(0).to(self.usage.device)
        return dispatch_combine(x, gates, self.moe_experts)

    def freeze_most_used(self, count: int) -> list[int]:
        """Freezes the `count` experts this task routed most samples to; returns their indices."""
        top = self.usage.topk(count).indices.tolist() if count else []
        self.frozen[top] = True
        self.usage.zero_()
        return top

    def apply_frozen(self) -> None:
        """requires_grad off for frozen experts (AdamW then skips them, as the official code leaves them
        out of its parameter list: finetune.py:97-100)."""
        for expert, frozen in zip(self.moe_experts, self.frozen.tolist()):
            expert.requires_grad_(not frozen)


class MoEBlock(nn.Module):
    """An open_clip ResidualAttentionBlock with its MoE layer: x <- x + attn(ln_1 x);
    x <- (x + mlp(ln_2 x)) + experts(x), the official order of the sums (model.py:465, :511)."""

    def __init__(self, block: nn.Module, moe: MoELayer):
        super().__init__()
        self.block, self.moe = block, moe

    def get_weight_dtype(self) -> torch.dtype:  # open_clip's transformer asks its first block
        return self.block.get_weight_dtype()

    def forward(self, q_x: torch.Tensor, k_x: Optional[torch.Tensor] = None, v_x: Optional[torch.Tensor] = None,
                attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        b = self.block
        x = q_x + b.ls_1(b.attention(q_x=b.ln_1(q_x), attn_mask=attn_mask))
        if self.moe.task == BYPASS:
            return x + b.ls_2(b.mlp(b.ln_2(x)))
        batch_first = b.attn.batch_first
        y = self.moe(x if batch_first else x.transpose(0, 1))
        return x + b.mlp(b.ln_2(x)) + (y if batch_first else y.transpose(0, 1))


def install_moe(blocks: nn.ModuleList, tasks: int, experts: int, top_k: int, seed: int = 0,
                generator: Optional[torch.Generator] = None, **expert_settings) -> list[MoELayer]:
    """Each open_clip ResidualAttentionBlock of `blocks` (a transformer's resblocks) replaced in place
    by its MoEBlock; returns the MoE layers in order. Experts' down weights drawn from `seed`."""
    generator = generator or torch.Generator().manual_seed(seed)
    layers = []
    for i, block in enumerate(blocks):
        if not isinstance(getattr(block, "ls_2", None), nn.Identity) or hasattr(block, "ln_1_kv"):
            raise ValueError(f"{type(block).__name__}: MoE-Adapters needs open_clip blocks without layer scale")
        layer = MoELayer(block.ln_2.normalized_shape[0], tasks, experts, top_k, **expert_settings)
        for expert in layer.moe_experts:
            expert.reset(generator)
        blocks[i] = MoEBlock(block, layer)
        layers.append(layer)
    return layers


def moe_layers(module: nn.Module) -> list[MoELayer]:
    return [m for m in module.modules() if isinstance(m, MoELayer)]


def set_route(module: nn.Module, task: int) -> None:
    for layer in moe_layers(module):
        layer.task = task
