"""LoRA: the encoder frozen, a low-rank update B A trained in its attention and MLP projections (a
transformer) or its ungrouped convolutions (a CNN); benchmark/models/adapters/lora.py says why the
layers are cfbench's own and not peft's. Combines with the penalty strategies: `lora+ldifs`
(features of the adapted encoder against its frozen reference), `lora+l2sp` (the penalty on the
parameters that train: A and B), `lora+zscl`.

merge: after each task B A is added into the frozen weights and a fresh adapter (B zero) starts the
next task, so each task trains its own low-rank update; false: one adapter trains through the sequence."""
from __future__ import annotations

import logging
import re

import torch
from avalanche.core import SupervisedPlugin

from benchmark.models.adapters import count_parameters, train_adapters_only
from benchmark.models.adapters.lora import auto_targets, install_lora, lora_layers

from .context import BuildContext

log = logging.getLogger("cfbench")
TOWERS = ("auto", "image", "both")


def targets_for(encoder, towers: str, target_modules: str, train_head: str = "linear") -> list[str]:
    """The module names LoRA wraps: `auto` (auto_targets of the towers) or those fully matching the
    regular expression `target_modules`. towers auto: the image tower, and the text tower too when
    the task heads are made of it (train.head text)."""
    prefixes = encoder.towers()
    wanted = ["image", "text"] if towers == "both" or (towers == "auto" and train_head == "text") else ["image"]
    under = tuple(prefixes[t] for t in wanted if t in prefixes)
    if target_modules == "auto":
        names = auto_targets(encoder, under)
    else:
        pattern = re.compile(target_modules)
        names = [n for n, _ in encoder.named_modules() if n and n.startswith(under) and pattern.fullmatch(n)]
    if not names:
        raise ValueError(f"target_modules {target_modules!r} matches no module of the encoder's "
                         f"{' and '.join(wanted)} tower(s)")
    return names


def install(encoder, context: BuildContext, rank: int, alpha: float, dropout: float, target_modules: str,
            towers: str, merge: bool) -> None:
    """LoRA in the encoder, everything else frozen (BatchNorm statistics too)."""
    names = targets_for(encoder, towers, target_modules, context.train_head)
    install_lora(encoder, names, rank, alpha, dropout, seed=context.seed)
    encoder.adapters_only = True
    train_adapters_only(encoder)
    log.info("LoRA rank %d, alpha %g in %d modules: %d trainable encoder parameters, %d frozen", rank, alpha,
             len(names), count_parameters(encoder, True), count_parameters(encoder, False))


class LoRAPlugin(SupervisedPlugin):
    """Folds each task's update into the frozen weights at the task's end (merge true)."""

    def __init__(self, merge: bool = False, seed: int = 0):
        super().__init__()
        self.merge, self.seed = merge, seed

    def after_training_exp(self, strategy, **kwargs):
        if self.merge:  # the next adapter's A from the run's seed and the task: the same in every process
            generator = torch.Generator().manual_seed(self.seed * 1000 + strategy.experience.current_experience + 1)
            for layer in lora_layers(strategy.model.encoder):
                layer.merge(generator)


def build(context: BuildContext, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
          target_modules: str = "auto", towers: str = "auto", merge: bool = False) -> list:
    return [LoRAPlugin(merge, context.seed)]
