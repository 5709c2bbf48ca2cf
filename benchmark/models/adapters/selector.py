"""MoE-Adapters' distribution-discriminative auto-selector (DDAS): one autoencoder per task on frozen
image features picks, per evaluation batch, the task whose router serves it -- or none (pure CLIP).

As the official mtil/ code at 4572d97:
- features: torchvision AlexNet's ImageNet `features` without their last ReLU and max-pool (conv5
  before its ReLU), on the CLIP-normalised images, then sigmoid, flattened (AutoEncoder.py:34-46,
  :177-185; evaluation.py:54-57); `extractor: clip` uses the frozen pretrained CLIP image embedding
  instead (for machines without AlexNet's weights; not the paper's);
- autoencoder: Linear(d, 100) ReLU Linear(100, d) Sigmoid, torch's default init (AutoEncoder.py:13-31);
  slot 0 is a reference domain (TinyImageNet there), slot i the i-th task; every slot exists from
  the start and untrained ones take part in the choice, as there;
- training: MSE to its input, Adam (weight decay 1e-4) whose lr is reset every step to
  0.01 * 0.1 ** (epoch // 10), epoch = step // batches per epoch (AutoEncoder.py:160, :180, :49-63),
  steps 0..iterations (range(iterations + 1));
- choice: the slot of least mean MSE over the batch (strict <, earlier slot on ties); the
  reference slot, or a least MSE above `threshold`, means no task (evaluation.py:58-71).
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .moe import BYPASS

class Autoencoder(nn.Module):
    def __init__(self, dims: int, code: int = 100):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(dims, code), nn.ReLU())
        self.decoder = nn.Sequential(nn.Linear(code, dims), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def alexnet_features(weights: Optional[str]) -> nn.Module:
    """AlexNet's convolutions up to conv5, before its ReLU. weights: a state-dict file of torchvision's
    alexnet, or None (random: tests only)."""
    import torchvision

    net = torchvision.models.alexnet(weights=None)
    if weights is not None:
        net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return net.features[:-2]


class TaskSelector(nn.Module):
    """Autoencoder slots over frozen features; `choose(images)` -> a task index or BYPASS."""

    def __init__(self, extractor: nn.Module, dims: int, tasks: int, threshold: float, seed: int = 0):
        super().__init__()
        self.extractor = extractor.eval().requires_grad_(False)
        with torch.random.fork_rng(devices=[]):  # torch's default init, from the run's seed alone
            torch.manual_seed(seed)
            self.autoencoders = nn.ModuleList(Autoencoder(dims) for _ in range(tasks + 1))
        self.autoencoders.requires_grad_(False)
        self.threshold = threshold
        self.register_buffer("trained", torch.zeros(tasks + 1, dtype=torch.bool))

    @torch.no_grad()
    def signature(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.extractor(images).float()).flatten(1)

    @torch.no_grad()
    def choose(self, images: torch.Tensor) -> int:
        s = self.signature(images)
        best, best_loss = 0, F.mse_loss(self.autoencoders[0](s), s)
        for i in range(1, len(self.autoencoders)):
            loss = F.mse_loss(self.autoencoders[i](s), s)
            if loss < best_loss:
                best, best_loss = i, loss
        return BYPASS if best == 0 or best_loss > self.threshold else best - 1

    def fit_slot(self, slot: int, batches: Callable[[], Iterator[torch.Tensor]], batches_per_epoch: int,
                 iterations: int, lr: float = 0.01, decay: bool = True, weight_decay: float = 1e-4) -> float:
        """Trains autoencoder `slot` on normalised images from `batches()`, a fresh pass every
        `batches_per_epoch` steps and whenever one runs out (AutoEncoder.py / few_shot_AutoEncoder.py:
        198-206); the lr steps down per 10 epochs of `batches_per_epoch` (decay false: `lr`
        throughout). Returns the last loss."""
        model = self.autoencoders[slot].requires_grad_(True).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=0.003, weight_decay=weight_decay)
        stream, loss = iter(()), torch.zeros(())  # a fresh pass starts at step 0
        for step in range(iterations + 1):
            if step % batches_per_epoch == 0:
                stream = batches()
            images = next(stream, None)
            if images is None:
                stream = batches()
                images = next(stream)
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.1 ** ((step // batches_per_epoch) // 10) if decay else lr
            s = self.signature(images)
            loss = F.mse_loss(model(s), s)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.requires_grad_(False).eval()
        self.trained[slot] = True
        return loss.item()
