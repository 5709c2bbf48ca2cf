"""MoE-Adapters (Yu et al., CVPR 2024; github JiazuoYu/MoE-Adapters4CL, mtil/ at 4572d97, the CVPR
version -- later commits, from 568fbdf, are "MoE-Adapters++"): CLIP frozen; in every block of both
towers 22 adapter experts beside the MLP, routed per sample by the current task's noisy top-2
router (benchmark/models/adapters/moe.py cites the model code). Per task:
- before training: the task's router is the one that trains and routes (task_id k ->
  router_list[k], clip/model.py:479-480); experts frozen by earlier tasks stay frozen
  (finetune.py:84-114); the selector's autoencoder of the task is fitted on its training images,
  augmented as the training is (AutoEncoder.py:153-159: train_preprocess)
  (300 steps; the reference slot, 1000 steps, before the first task: train_full_shot_router11_
  experts22_1000iters.sh:23-50);
- the training step: logit_scale.exp() * cos(image, text of the task's classes, one template),
  the text tower run first (the noise and dropout draws in the official order), logit_scale frozen,
  the run's CE with label smoothing (finetune.py:31-34, :172-182) -- the protocol row sets AdamW,
  the per-task lr list, 1000 iterations, batch 64, smoothing 0.2, warm-up 100;
- after training: the `freeze_top` experts each block routed most samples to (image and text
  forwards of the task's training) are frozen for good (finetune.py:195-220).
Evaluation routes each batch through the selector (benchmark/models/adapters/selector.py): its
task's router, or pure CLIP -- so accuracy depends on the evaluation batch (eval.batch_size, in the
run's config; the official 128, args.py:12)."""
from __future__ import annotations

import logging
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin
from torch import nn

from tasks import split_count
from tasks.compact import gather

from benchmark.models.adapters import FrozenImageFeatures, count_parameters, train_adapters_only, vit_towers
from benchmark.models.adapters.moe import BYPASS, install_moe, moe_layers, set_route
from benchmark.models.adapters.selector import TaskSelector, alexnet_features
from benchmark.models.weights import require_alexnet

from .context import BuildContext
from .references import reference_images

log = logging.getLogger("cfbench")


def _extractor(encoder, kind: str, seed: int) -> nn.Module:
    if kind == "clip":
        return FrozenImageFeatures(encoder.image_tower_copy())
    if kind == "alexnet-random":  # tests only: random weights, from the run's seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return alexnet_features(None)
    return alexnet_features(require_alexnet())


class SelectorRoute:
    """The encoder's per-batch route at evaluation: the selector's task (or BYPASS) on every MoE
    layer of both towers; `encoder.last_route` keeps it for the text side of the same batch."""

    def __init__(self, selector: TaskSelector):
        self.selector = selector

    def __call__(self, encoder, images: torch.Tensor) -> int:
        task = self.selector.choose(images)
        set_route(encoder, task)
        return task


def install(encoder, context: BuildContext, experts: int, top_k: int, freeze_top: int, bottleneck: int,
            extractor: str, threshold: float, reference_task: Optional[str], reference_iterations: int,
            selector_iterations: int, selector_batch_size: int, selector_lr: float = 0.01,
            selector_lr_decay: bool = True, selector_epoch: str = "trained") -> None:
    towers = vit_towers(encoder, "experts")
    if not context.tasks:
        raise ValueError("needs the run's trained tasks (one router each)")
    features = _extractor(encoder, extractor, context.seed)  # before the experts: `clip` reads pretrained CLIP
    generator = torch.Generator().manual_seed(context.seed)
    layers = [layer for tower in towers
              for layer in install_moe(tower.resblocks, len(context.tasks), experts, top_k, generator=generator,
                                       bottleneck=bottleneck)]
    with torch.no_grad():
        dims = features(torch.zeros(1, 3, encoder.image_size, encoder.image_size)).flatten(1).shape[1]
    encoder.selector = TaskSelector(features, dims, len(context.tasks), threshold, seed=context.seed)
    encoder.batch_router = SelectorRoute(encoder.selector)
    encoder.adapters_only = True
    train_adapters_only(encoder)
    log.info("MoE-Adapters: %d experts (top-%d) in %d blocks, %d routers each; selector on %s features (%d): "
             "%d trainable parameters, %d frozen", experts, top_k, len(layers), len(context.tasks), extractor, dims,
             count_parameters(encoder, True), count_parameters(encoder, False))


class MoEAdaptersPlugin(SupervisedPlugin):
    def __init__(self, context: BuildContext, freeze_top: int, reference_task: Optional[str],
                 reference_iterations: int, selector_iterations: int, selector_batch_size: int,
                 selector_lr: float = 0.01, selector_lr_decay: bool = True, selector_epoch: str = "trained"):
        super().__init__()
        self.selector_lr, self.selector_lr_decay, self.selector_epoch = selector_lr, selector_lr_decay, selector_epoch
        self.context, self.freeze_top = context, freeze_top
        self.reference_task, self.reference_iterations = reference_task, reference_iterations
        self.selector_iterations, self.selector_batch_size = selector_iterations, selector_batch_size
        self.frozen_log: list[list[int]] = []  # per task, per block: the experts frozen after it

    def before_training_exp(self, strategy, **kwargs):
        encoder = strategy.model.encoder
        t = strategy.experience.current_experience
        for layer in moe_layers(encoder):
            layer.apply_frozen()
            layer.usage.zero_()
        selector = encoder.selector
        augment = getattr(strategy, "train_augment", None)  # the official trains its autoencoders on train_preprocess
        if self.reference_task and not bool(selector.trained[0]):
            images = reference_images(self.context, self.reference_task, "train")
            self._fit(encoder, 0, images, self.reference_iterations, seed=self.context.seed * 1000 - 1, augment=augment)
        self._fit(encoder, t + 1, strategy.train_splits[t].x, self.selector_iterations,
                  seed=self.context.seed * 1000 + t, epoch=self._epoch_batches(t), augment=augment)
        set_route(encoder, t)

    def _epoch_batches(self, t: int) -> Optional[int]:
        """selector_epoch split: the batches of task t's whole train split, the few-shot script's
        `num_batches = len(dataset.train_loader)` (few_shot_AutoEncoder.py:193), which restarts its 5-shot
        loader (:199-200) and steps the lr decay (:211); trained: None, the batches of the images fitted."""
        if self.selector_epoch == "trained":
            return None
        ctx = self.context
        return -(-split_count(ctx.tasks[t], ctx.train_split, ctx.data_root, None, ctx.seed) // self.selector_batch_size)

    def _fit(self, encoder, slot: int, images, iterations: int, seed: int, epoch: Optional[int] = None,
             augment: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> None:
        """Autoencoder `slot` on `images` in batches of a private permutation per pass, each batch through
        the run's training augmentation (AutoEncoder.py:153-159 builds the task's dataset with
        train_preprocess: RandomResizedCrop) with crop boxes drawn from `seed` alone; with `once`, one view
        per image of its own (the few-shot chooser stacks its own augmented pass, few_shot_AutoEncoder.py:
        167-189)."""
        count = len(images)
        per_epoch = -(-count // self.selector_batch_size)
        generator = torch.Generator().manual_seed(seed)
        device = next(encoder.parameters()).device

        def batches() -> Iterator[torch.Tensor]:
            order = torch.randperm(count, generator=generator)
            for k in range(per_epoch):
                index = order[k * self.selector_batch_size:(k + 1) * self.selector_batch_size]
                x = gather(images, index, device)
                if views is not None:
                    x = augment(x, boxes=views[index])
                elif augment is not None:
                    x = augment(x)
                yield encoder.normalize(x)

        with torch.random.fork_rng(devices=[]):  # the crops' draws: the training's RNG is left as it was
            torch.manual_seed(seed)
            views = augment.views(images) if getattr(augment, "once", False) else None
            loss = encoder.selector.fit_slot(slot, batches, epoch or per_epoch, iterations, self.selector_lr,
                                             self.selector_lr_decay)
        log.info("MoE-Adapters selector: slot %d fitted (%d steps, last loss %.4f)", slot, iterations, loss)

    def training_forward(self, strategy) -> torch.Tensor:
        """The task's text head, with the text tower run before the image tower as the official step
        does (finetune.py:172-181): the gating noise and expert dropout are drawn in its order."""
        encoder = strategy.model.encoder
        head = strategy.model.heads[str(strategy.experience.current_experience)]
        text = F.normalize(encoder.encode_text(head.tokens).float(), dim=-1)
        image = F.normalize(encoder(strategy.mb_x).float(), dim=-1)
        return encoder.clip.logit_scale.exp() * image @ text.T

    def after_training_exp(self, strategy, **kwargs):
        frozen = [layer.freeze_most_used(self.freeze_top) for layer in moe_layers(strategy.model.encoder)]
        self.frozen_log.append(frozen)
        set_route(strategy.model.encoder, BYPASS)


def build(context: BuildContext, experts: int = 22, top_k: int = 2, freeze_top: int = 2, bottleneck: int = 64,
          extractor: str = "alexnet", threshold: float = 0.0655, reference_task: Optional[str] = None,
          reference_iterations: int = 1000, selector_iterations: int = 300, selector_batch_size: int = 64,
          selector_lr: float = 0.01, selector_lr_decay: bool = True, selector_epoch: str = "trained") -> list:
    if top_k > experts or freeze_top > experts:
        raise ValueError(f"top_k ({top_k}) and freeze_top ({freeze_top}) must not exceed experts ({experts})")
    return [MoEAdaptersPlugin(context, freeze_top, reference_task, reference_iterations, selector_iterations,
                              selector_batch_size, selector_lr, selector_lr_decay, selector_epoch)]
