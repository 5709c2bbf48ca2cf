"""DIKI (Tang et al., ECCV 2024; github lloongx/DIKI at 8ef89e7): CLIP frozen; per task, prefix keys
and values in the first `depth` blocks of both towers, attended through their own softmax and added
before out_proj (benchmark/models/adapters/prefix.py); a Gaussian per task over the frozen CLIP's
image embeddings picks each evaluation batch's prefix and weighs it per sample
(benchmark/models/adapters/gaussian.py). Per task, as DIKI/DIKI.py's train_one_task (:338-434):
- before training: the task's Gaussian, from its training images (:361-376); its prefix is the one
  that trains and is used, weight 1 (the task id given: :162-166);
- training: the run's loop -- the protocol row sets SGD lr 5 without momentum or weight decay,
  10 epochs at batch 128, a per-step cosine to lr * 1e-3 without warm-up (:346-352, utils.py:10-25),
  cross-entropy over the task's classes of logit_scale.exp() * cos(image, text of templates[0])
  (:389-392, :192-194);
- after each epoch (best_epoch true): accuracy on the task's validation split, the task given
  (:414-434); the prefixes of the best epoch (the earliest of equals) are restored after the task
  (:320-325).
Evaluation routes each batch (its majority task, each sample's calibration weight): accuracy depends
on eval.batch_size (the official 256, batch_size * 2: :473-476) and on the batches' order. The zero-
shot classifier at evaluation is templates[0] alone, as the official (:94)."""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin

from benchmark.models.adapters import FrozenImageFeatures, count_parameters, train_adapters_only, vit_towers
from benchmark.models.adapters.gaussian import GaussianTaskIdentifier
from benchmark.models.adapters.moe import BYPASS
from benchmark.models.adapters.prefix import install_prefixes, prefix_layers, set_prefix_route
from tasks.compact import gather
from tasks.loading import load_split

from .context import BuildContext

log = logging.getLogger("cfbench")
FEATURE_BATCH = 256


class DIKIRoute:
    """Each evaluation batch: the identifier's task for both towers, each sample's weight in the image
    tower, their mean in the text tower; the route (task, text weight) names the text side."""

    def __call__(self, encoder, images: torch.Tensor):
        features = F.normalize(encoder.diki_features(images).float(), dim=-1)
        task, weights, text_weight = encoder.diki_identifier.identify(features)
        if task == BYPASS:
            set_prefix_route(encoder.diki_image_layers + encoder.diki_text_layers, BYPASS)
            return BYPASS
        set_prefix_route(encoder.diki_image_layers, task, weights.to(images.device))
        set_prefix_route(encoder.diki_text_layers, task, text_weight)
        return task, text_weight


def install(encoder, context: BuildContext, depth: int, length: int, calibration_scale: float,
            calibration_shift: float, best_epoch: bool, val_per_class: int) -> None:
    image_tower, text_tower = vit_towers(encoder, "prefixes")
    if not context.tasks:
        raise ValueError("needs the run's trained tasks (one prefix each)")
    encoder.diki_features = FrozenImageFeatures(encoder.image_tower_copy())  # before the prefixes
    generator = torch.Generator().manual_seed(context.seed)
    tasks = len(context.tasks)
    encoder.diki_image_layers = install_prefixes(image_tower.resblocks, depth, tasks, length, generator)
    encoder.diki_text_layers = install_prefixes(text_tower.resblocks, depth, tasks, length, generator)
    encoder.diki_identifier = GaussianTaskIdentifier(encoder.feature_dim, tasks, calibration_scale,
                                                     calibration_shift)
    encoder.batch_router = DIKIRoute()
    encoder.route_templates = 1
    encoder.adapters_only = True
    train_adapters_only(encoder)
    log.info("DIKI: %d-token prefixes in %d image and %d text blocks, %d tasks: %d trainable parameters, %d frozen",
             length, len(encoder.diki_image_layers), len(encoder.diki_text_layers), tasks,
             count_parameters(encoder, True), count_parameters(encoder, False))


class DIKIPlugin(SupervisedPlugin):
    def __init__(self, context: BuildContext, best_epoch: bool, val_per_class: int = 0):
        super().__init__()
        self.context, self.best_epoch, self.val_per_class = context, best_epoch, val_per_class
        self._best: tuple[float, int, list[torch.Tensor]] = (-1.0, -1, [])
        self._epoch = 0
        self.chosen_epochs: list[int] = []  # per task, the epoch whose prefixes were kept

    def before_training_exp(self, strategy, **kwargs):
        encoder, t = strategy.model.encoder, strategy.experience.current_experience
        encoder.diki_identifier.fit(t, self._features(encoder, strategy.train_splits[t].x))
        set_prefix_route(prefix_layers(encoder), t)
        self._best, self._epoch = (-1.0, -1, []), 0

    @torch.no_grad()
    def _features(self, encoder, images) -> torch.Tensor:
        device = next(encoder.parameters()).device
        out = [F.normalize(encoder.diki_features(encoder.normalize(gather(images, slice(k, k + FEATURE_BATCH), device)))
                           .float(), dim=-1) for k in range(0, len(images), FEATURE_BATCH)]
        return torch.cat(out)

    def after_training_epoch(self, strategy, **kwargs):
        if self.best_epoch:
            accuracy = self._validation_accuracy(strategy)
            if accuracy > self._best[0]:  # strictly better: the earliest of equal epochs stays
                pools = [p.detach().clone() for p in self._pools(strategy)]
                self._best = (accuracy, self._epoch, pools)
        self._epoch += 1

    @torch.no_grad()
    def _validation_accuracy(self, strategy) -> float:
        model, t = strategy.model, strategy.experience.current_experience
        ctx = self.context
        val = load_split(ctx.tasks[t], "val", ctx.image_size, ctx.data_root, self.val_per_class or None, ctx.seed,
                         ctx.cache_dir, ctx.cache_format)
        was_training = model.training
        model.eval()
        device = strategy.device
        correct = 0
        for k in range(0, len(val), FEATURE_BATCH):  # the task given: its prefix, weight 1 (router off)
            x = gather(val.x, slice(k, k + FEATURE_BATCH), device)
            features = model.encoder.encode_image(model.encoder.normalize(x))
            correct += int((model.head_logits(t, features).argmax(dim=1).cpu() == val.y[k:k + FEATURE_BATCH]).sum())
        model.train(was_training)
        return correct / max(1, len(val))

    @staticmethod
    def _pools(strategy) -> list[torch.nn.Parameter]:
        return [layer.prefix_pool for layer in prefix_layers(strategy.model.encoder)]

    @torch.no_grad()
    def after_training_exp(self, strategy, **kwargs):
        accuracy, epoch, pools = self._best
        if pools:
            for p, best in zip(self._pools(strategy), pools):
                p.copy_(best)
            log.info("DIKI: prefixes of epoch %d kept (validation accuracy %.2f%%)", epoch + 1, 100 * accuracy)
        self.chosen_epochs.append(epoch)


def build(context: BuildContext, depth: int = 8, length: int = 8, calibration_scale: float = 512.0,
          calibration_shift: float = 1.0, best_epoch: bool = True, val_per_class: int = 0) -> list:
    return [DIKIPlugin(context, best_epoch, val_per_class)]
