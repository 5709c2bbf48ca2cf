"""DIKI's task identification (lloongx/DIKI at 8ef89e7, DIKI/DIKI.py): a Gaussian per task over the
frozen pretrained CLIP's L2-normalised image embeddings, and per evaluation batch the task of the
majority of its samples with a calibration weight per sample.

- fit (DIKI.py:361-376): mean, unbiased covariance (F - mu)^T (F - mu) / (N - 1) + 1e-7 I, float32;
- identify (DIKI.py:157-182): log N(f; mu_t, Sigma_t) for every learned task; each sample's best task
  and its weight w = sigmoid(best log-likelihood / scale - shift) (scale 512, shift 1: hard-coded
  there); the batch's task is the most frequent best task (torch.unique + topk of the counts); the
  text tower's weight is the mean of the samples' weights. No task learned yet: BYPASS.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributions import MultivariateNormal

from .moe import BYPASS


class GaussianTaskIdentifier(nn.Module):
    def __init__(self, dims: int, tasks: int, scale: float = 512.0, shift: float = 1.0):
        super().__init__()
        self.register_buffer("means", torch.zeros(tasks, dims))
        self.register_buffer("covariances", torch.zeros(tasks, dims, dims))
        self.register_buffer("learnt", torch.zeros((), dtype=torch.long))
        self.scale, self.shift = scale, shift

    @torch.no_grad()
    def fit(self, task: int, features: torch.Tensor) -> None:
        """The task's Gaussian from its training images' features (rows); tasks are fitted in order."""
        features = features.float()
        mean = features.mean(dim=0)
        delta = features - mean.unsqueeze(0)
        covariance = delta.t() @ delta / (features.shape[0] - 1)
        covariance += torch.eye(covariance.shape[0], device=covariance.device) * 1e-7
        self.means[task], self.covariances[task] = mean, covariance
        self.learnt.fill_(task + 1)

    @torch.no_grad()
    def identify(self, features: torch.Tensor) -> tuple[int, torch.Tensor, float]:
        """(the batch's task, each sample's weight, the text tower's weight) for L2-normalised features."""
        learnt = int(self.learnt)
        if learnt == 0:
            return BYPASS, torch.ones(len(features)), 1.0
        features = features.float()
        log_probs = torch.vstack([MultivariateNormal(self.means[t], self.covariances[t]).log_prob(features)
                                  for t in range(learnt)]).t()
        best, indices = log_probs.topk(k=1, dim=1)
        weights = torch.sigmoid(best.squeeze(1) / self.scale - self.shift)
        task_ids, counts = torch.unique(indices, return_counts=True, sorted=True)
        task = int(task_ids[counts.topk(k=1).indices].item())
        return task, weights, float(weights.mean())
