"""L2SP (Xuhong et al., 2018): CE + alpha * sum ||w - w_ref||^2 over encoder parameters."""
from __future__ import annotations

from typing import Optional

import torch
from avalanche.core import SupervisedPlugin
from torch import nn


def l2sp_penalty(encoder: nn.Module, reference: dict[str, torch.Tensor]) -> torch.Tensor:
    terms = [((p - reference[name]) ** 2).sum() for name, p in encoder.named_parameters() if p.requires_grad]
    return torch.stack(terms).sum()


class L2SPPlugin(SupervisedPlugin):
    @property
    def checkpoint_attrs(self) -> tuple[str, ...]:
        """What --resume restores: the pretrained reference (the previous one is taken again when the
        next task starts)."""
        return ("reference_params",) if self.reference == "pretrained" else ()

    def __init__(self, alpha: float = 0.5, reference: str = "previous"):
        super().__init__()
        if reference not in ("previous", "pretrained"):
            raise ValueError(f"reference must be previous or pretrained, not {reference!r}")
        self.alpha, self.reference = float(alpha), reference
        self.reference_params: Optional[dict[str, torch.Tensor]] = None
        self.last_penalty: Optional[torch.Tensor] = None

    def before_training_exp(self, strategy, **kwargs):
        if self.reference == "previous" or self.reference_params is None:
            # the parameters that train: a frozen text tower is never in the penalty
            self.reference_params = {n: p.detach().clone() for n, p in strategy.model.encoder.named_parameters()
                                     if p.requires_grad}

    def before_backward(self, strategy, **kwargs):
        penalty = l2sp_penalty(strategy.model.encoder, self.reference_params)
        self.last_penalty = penalty.detach()
        strategy.loss += self.alpha * penalty
