"""Per-step training controls as plugins: the learning-rate schedule (linear warm-up, then cosine
decay to 0, as the official LDIFS/WiSE-FT code, restarted at every task) and gradient clipping."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from avalanche.core import SupervisedPlugin


def warmup_cosine(step: int, total: int, warmup: int, floor: float = 0.0) -> float:
    """Multiplier of the base learning rate at 0-indexed `step` of `total`: (step + 1) / warmup
    during the warm-up -- for the whole task when it is shorter than the warm-up, as the official
    cosine_lr (ldifs_code train_utils.py:30-47; ZSCL mtil/src/utils.py) -- then cosine to `floor`
    (DIKI's build_cosine_scheduler: floor + (1 - floor) * (1 + cos(pi i / N)) / 2, DIKI/utils.py:10-25)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class WarmupCosinePlugin(SupervisedPlugin):
    """base_lr: one value, or one per experience (a per-task learning rate). horizon: the steps the
    cosine spans (None: the task's steps); ZSCL's loop runs horizon + 1 steps, the last at lr 0."""

    def __init__(self, base_lr: Union[float, Sequence[float]], warmup_steps: int, horizon: Optional[int] = None,
                 floor: float = 0.0):
        super().__init__()
        self.base_lrs, self.warmup, self.horizon, self.floor = base_lr, warmup_steps, horizon, floor
        self.base_lr, self.step, self.total = 0.0, 0, 1

    def before_training_exp(self, strategy, **kwargs):
        self.step, self.total = 0, self.horizon or len(strategy.dataloader) * strategy.train_epochs
        lrs = self.base_lrs
        self.base_lr = lrs if isinstance(lrs, (int, float)) else lrs[strategy.experience.current_experience]

    def before_training_iteration(self, strategy, **kwargs):
        lr = self.base_lr * warmup_cosine(self.step, self.total, self.warmup, self.floor)
        for group in strategy.optimizer.param_groups:
            group["lr"] = lr
        self.step += 1


class GradClipPlugin(SupervisedPlugin):
    """Clip the global gradient norm of the trained parameters after every backward pass
    (torch.nn.utils.clip_grad_norm_, as the official LDIFS code does before each step)."""

    def __init__(self, max_norm: float):
        super().__init__()
        self.max_norm = float(max_norm)
        self.last_norm = None  # total norm before clipping (a tensor: no device sync per step)

    def after_backward(self, strategy, **kwargs):
        params = [p for p in strategy.model.parameters() if p.requires_grad]
        self.last_norm = torch.nn.utils.clip_grad_norm_(params, self.max_norm)
