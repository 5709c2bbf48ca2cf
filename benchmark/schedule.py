"""Per-task learning-rate schedule: linear warmup, then cosine decay to 0 (as the official
LDIFS/WiSE-FT code), restarted at every task."""
from __future__ import annotations

import math

from avalanche.core import SupervisedPlugin


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Multiplier of the base learning rate at 0-indexed `step` of `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class WarmupCosinePlugin(SupervisedPlugin):
    def __init__(self, base_lr: float, warmup_steps: int):
        super().__init__()
        self.base_lr, self.warmup = base_lr, warmup_steps
        self.step, self.total = 0, 1

    def before_training_exp(self, strategy, **kwargs):
        self.step, self.total = 0, len(strategy.dataloader) * strategy.train_epochs

    def before_training_iteration(self, strategy, **kwargs):
        lr = self.base_lr * warmup_cosine(self.step, self.total, min(self.warmup, self.total))
        for group in strategy.optimizer.param_groups:
            group["lr"] = lr
        self.step += 1
