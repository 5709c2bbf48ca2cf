"""Encoder + one head per task, as an Avalanche MultiTaskModule."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from avalanche.models import MultiTaskModule
from torch import nn

from ..models.base import FoundationModel

PAD_LOGIT = -1e4


class NormalizedLinear(nn.Module):
    """A linear head on L2-normalized features (the official LDIFS code's ClassificationHead)."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(F.normalize(features, dim=-1))

    @torch.no_grad()
    def load(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        self.linear.weight.copy_(weight)
        self.linear.bias.copy_(bias)


class TextHead(nn.Module):
    """A task's classifier made of the encoder's *current* text embeddings of one prompt per class:
    logits = logit_scale.exp() * cos(image, text), as ZSCL trains (mtil/src/models/finetune.py:213-224).
    It holds only the tokenized prompts; the text tower it runs is the encoder's (and trains with it)."""

    def __init__(self, tokens: torch.Tensor):
        super().__init__()
        self.register_buffer("tokens", tokens, persistent=False)

    def forward(self, features: torch.Tensor, encoder: FoundationModel) -> torch.Tensor:
        dtype = encoder.autocast_dtype
        with torch.autocast(device_type=features.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            text = encoder.encode_text(self.tokens)
        text = F.normalize(text.float(), dim=-1)
        return encoder.clip.logit_scale.exp() * F.normalize(features.float(), dim=-1) @ text.T


def _apply_head(head: nn.Module, features: torch.Tensor, encoder: FoundationModel) -> torch.Tensor:
    if isinstance(head, TextHead):
        return head(features, encoder)
    return head(features.to(head.linear.weight.device))


class SingleTask(nn.Module):
    """One task's classifier: the shared encoder and the task's head (the same modules, not copies)."""

    def __init__(self, encoder: FoundationModel, head: nn.Module):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _apply_head(self.head, self.encoder(x), self.encoder)


class MultiHeadClassifier(MultiTaskModule):
    def __init__(self, encoder: FoundationModel):
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict()

    def ensure_head(self, task_label: int, num_classes: int) -> NormalizedLinear:
        """The task's head, created zero-initialised if missing."""
        key = str(task_label)
        if key not in self.heads:
            device = next(self.encoder.parameters()).device
            self.heads[key] = NormalizedLinear(self.encoder.feature_dim, num_classes).to(device)
        return self.heads[key]

    def ensure_text_head(self, task_label: int, prompts: list[str]) -> TextHead:
        """The task's text head over `prompts` (one per class), created if missing."""
        key = str(task_label)
        if key not in self.heads:
            device = next(self.encoder.parameters()).device
            self.heads[key] = TextHead(self.encoder.tokenizer(prompts)).to(device)
        return self.heads[key]

    def head_logits(self, task_label: int, features: torch.Tensor) -> torch.Tensor:
        """The task's head applied to pooled features (linear or text head)."""
        return _apply_head(self.heads[str(int(task_label))], features, self.encoder)

    def task_module(self, task_label: int) -> "SingleTask":
        """The encoder and this task's head alone, as one module (what DistributedDataParallel wraps)."""
        return SingleTask(self.encoder, self.heads[str(int(task_label))])

    def forward(self, x: torch.Tensor, task_labels) -> torch.Tensor:
        """Unlike Avalanche's MultiTaskModule.forward, a single-task batch gets exactly its head's
        classes (no zero-padding to the widest head, which would add fake classes to the loss)."""
        if task_labels is None:
            return self.forward_all_tasks(x)
        if isinstance(task_labels, int):
            return self.forward_single_task(x, task_labels)
        tasks = torch.unique(task_labels)
        if len(tasks) == 1:
            return self.forward_single_task(x, int(tasks.item()))
        outputs = {int(t): self.forward_single_task(x[task_labels == t], int(t)) for t in tasks}
        width = max(o.shape[1] for o in outputs.values())
        out = x.new_full((x.shape[0], width), PAD_LOGIT, dtype=torch.float32)
        for t, o in outputs.items():  # padded classes get (numerically) zero probability
            out[task_labels == t, : o.shape[1]] = o.float()
        return out

    def forward_single_task(self, x: torch.Tensor, task_label: int) -> torch.Tensor:
        return self.head_logits(task_label, self.encoder(x))
