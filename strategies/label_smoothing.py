"""`ls`: cross-entropy with smoothed labels, the official code's `--finetune-loss ls`
(omegafragger/ldifs_code, finetune_functions.py:210-211 -> loss/label_smoothing.py):
loss = mean over the batch of (1 - s) * (-log p_y) + s * mean_k(-log p_k).

This is exactly torch's CrossEntropyLoss(label_smoothing=s) (whose smoothing term is the mean over
classes too), i.e. `train.label_smoothing: s`; as a strategy it has a name, a row in comparisons and
its own factor. The official default `--ls-factor` is 0.0 (args.py:74-78), which is plain CE: give
the factor you compare.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin


def label_smoothing_loss(logits: torch.Tensor, target: torch.Tensor, smoothing: float) -> torch.Tensor:
    logprobs = F.log_softmax(logits, dim=-1)
    nll = -logprobs.gather(dim=-1, index=target.unsqueeze(1)).squeeze(1)
    return ((1.0 - smoothing) * nll + smoothing * -logprobs.mean(dim=-1)).mean()


class LabelSmoothingPlugin(SupervisedPlugin):
    def __init__(self, smoothing: float = 0.1):
        super().__init__()
        if not 0 <= smoothing < 1:
            raise ValueError(f"smoothing must be in [0, 1), not {smoothing!r}")
        self.smoothing = float(smoothing)

    def training_loss(self, strategy) -> torch.Tensor:
        return label_smoothing_loss(strategy.mb_output, strategy.mb_y, self.smoothing)
