"""WiSE-FT (Wortsman et al., 2022): after each task, theta <- (1 - beta) theta_before + beta theta_after."""
from __future__ import annotations

from typing import Optional

import torch
from avalanche.core import SupervisedPlugin


def interpolate_state(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor],
                      beta: float) -> dict[str, torch.Tensor]:
    """Floating-point entries interpolated; others (counters) and entries the task left unchanged
    (a frozen text tower) keep the trained value bit for bit ((1-b)x + bx can differ from x in the
    last bit)."""
    return {k: ((1 - beta) * before[k] + beta * v
                if k in before and v.is_floating_point() and not torch.equal(before[k], v) else v)
            for k, v in after.items()}


class WiSEFTPlugin(SupervisedPlugin):
    def __init__(self, beta: float = 0.5):
        super().__init__()
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], not {beta}")
        self.beta = float(beta)
        self._before: Optional[dict[str, torch.Tensor]] = None

    def before_training_exp(self, strategy, **kwargs):
        self._before = {k: v.detach().clone() for k, v in strategy.model.state_dict().items()}

    def after_training_exp(self, strategy, **kwargs):
        after = {k: v.detach() for k, v in strategy.model.state_dict().items()}
        strategy.model.load_state_dict(interpolate_state(self._before, after, self.beta))
        self._before = None
