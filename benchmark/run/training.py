"""The training loop's fast path: Avalanche's Naive, fed whole minibatches by `TensorBatches`
(run/batches.py) instead of Avalanche's per-sample loader. Batches keep the suite's layout
(x, y, sample index, task label), so every plugin works unchanged.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable, Optional

import torch
from avalanche.core import SupervisedPlugin
from avalanche.training import Naive
from torch.nn.parallel import DistributedDataParallel

from tasks import TensorSplit

from .. import progress
from ..distributed import all_reduce_sum, shard, shard_weight, world
from ..errors import CfbenchError
from .batches import TensorBatches


class FastNaive(Naive):
    """Naive fine-tuning whose training minibatches come from `TensorBatches`.

    train_splits[t] must be the tensors behind experience t of the stream being trained.
    train_steps: an iteration budget per task (then train_epochs should be 1); None = epochs.
    train_augment: applied to each training batch's images once they are on the device; plugins
    (and LDIFS's reference pass) see the augmented batch as `strategy.mb_x`.

    A strategy whose objective is not the head's cross-entropy (FLYP's contrastive loss, label
    smoothing) gives one plugin `training_forward(strategy)` and/or `training_loss(strategy)`: they
    replace the forward and the criterion while training; penalties still add to the loss after it.

    Under torch.distributed (benchmark/distributed.py) each rank trains its shard of every global
    batch through a DistributedDataParallel wrapper of the encoder and the current task's head,
    made anew for each task once its head exists (a wrapper of the whole multi-head model would
    wait forever for the gradients of the other tasks' heads, which a task's loss never reaches).
    The criterion, and every batch-mean penalty, is multiplied by `shard_weight`.
    """

    def __init__(self, *, train_splits: list[TensorSplit], train_steps: Optional[int] = None,
                 train_augment: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, **kwargs):
        super().__init__(**kwargs)
        self.train_splits, self.train_steps, self.train_augment = train_splits, train_steps, train_augment
        self._forward_owner = _the_one(self.plugins, "training_forward")
        self._loss_owner = _the_one(self.plugins, "training_loss")
        self.ranks = world()
        if self.ranks.active and self._forward_owner is not None:
            raise CfbenchError(f"{type(self._forward_owner).__name__} replaces the training forward, which "
                               "DistributedDataParallel must run; train it in one process")
        self.shard_weight = 1.0  # N * n_r / B of the current batch (benchmark/distributed.py)
        self._ddp: Optional[DistributedDataParallel] = None
        self._outside: list[torch.nn.Parameter] = []  # the model's parameters the DDP wrapper leaves out

    def forward(self):
        if self.is_training and self._forward_owner is not None:
            return self._forward_owner.training_forward(self)
        if self.is_training and self._ddp is not None:
            return self._ddp(self.mb_x)
        return super().forward()

    def criterion(self):
        if self.is_training and self._loss_owner is not None:
            loss = self._loss_owner.training_loss(self)
        else:
            loss = super().criterion()
        return loss * self.shard_weight if self.is_training and self.ranks.active else loss

    def _check_plugin_compatibility(self) -> bool:
        """Avalanche lists every plugin not written for its own distributed helper; this loop shards
        the batches itself, and the strategies it cannot run exactly over several processes were
        refused before the run started (strategies.check_data_parallel)."""
        return True

    def _wrap_for_ranks(self) -> None:
        task = self.model.task_module(self.experience.current_experience)
        ids = [self.device.index if self.device.index is not None else torch.cuda.current_device()] \
            if self.device.type == "cuda" else None
        # buffers never change while training (BatchNorm statistics are not synchronised: see README)
        self._ddp = DistributedDataParallel(task, device_ids=ids, broadcast_buffers=False)
        inside = {id(p) for p in task.parameters()}
        self._outside = [p for p in self.model.parameters() if id(p) not in inside]

    def backward(self) -> None:
        super().backward()
        if self.is_training and self._ddp is not None:
            self._average_outside_gradients()

    def _average_outside_gradients(self) -> None:
        """Parameters outside the DDP wrapper that the loss reached (LwF distils the previous tasks'
        heads, which then train): their gradients averaged over the ranks as DDP averages its own."""
        outside = [p.grad for p in self._outside if p.grad is not None]
        all_reduce_sum(outside)
        for grad in outside:
            grad.div_(self.ranks.size)

    def _after_training_exp(self, **kwargs):
        self._ddp, self._outside = None, []  # its gradient hooks go with it
        super()._after_training_exp(**kwargs)

    def make_train_dataloader(self, shuffle: bool = True, pin_memory: Optional[bool] = None, **kwargs) -> None:
        t = self.experience.current_experience
        pin = self.device.type == "cuda" if pin_memory is None else pin_memory
        self.dataloader = TensorBatches(self.train_splits[t], t, self.train_mb_size, shuffle, pin, self.train_steps,
                                        self.device, self.ranks)
        if getattr(self.train_augment, "once", False):  # each image's one view for this task, the same on every rank
            self._views = self.train_augment.views(self.train_splits[t].x)

    def make_optimizer(self, **kwargs) -> None:
        """Called before each task: fresh optimizer state over the parameters that train (a frozen
        text tower stays out; Avalanche's default would put every parameter of the model back in)."""
        self.optimizer.state = defaultdict(dict)
        self.optimizer.param_groups[0]["params"] = [p for p in self.model.parameters() if p.requires_grad]
        if self.ranks.active:
            self._wrap_for_ranks()

    @property
    def mb_sample_index(self) -> torch.Tensor:
        """Each minibatch sample's position in the experience's dataset (TensorBatches yields it);
        LDIFS keys its per-sample reference cache by it."""
        return self.mbatch[2]

    def _unpack_minibatch(self):
        super()._unpack_minibatch()
        if not self.is_training:
            return
        total = self.dataloader.global_size
        self.shard_weight = shard_weight(total, self.ranks)
        if getattr(self.train_augment, "once", False):  # each sample's own view, whichever rank reads it
            self.mbatch[0] = self.train_augment(self.mbatch[0], boxes=self._views[self.mb_sample_index.cpu()])
        elif self.train_augment is not None and self.ranks.active:  # the whole batch's crop boxes, this shard's crops
            self.mbatch[0] = self.train_augment(self.mbatch[0], total, shard(total, self.ranks))
        elif self.train_augment is not None:
            self.mbatch[0] = self.train_augment(self.mbatch[0])


def _the_one(plugins, hook: str):
    owners = [p for p in plugins if hasattr(p, hook)]
    if len(owners) > 1:
        raise CfbenchError(f"{' and '.join(type(p).__name__ for p in owners)} both replace the training {hook[9:]}; "
                           "combine at most one of them")
    return owners[0] if owners else None


def configure_for_device(encoder, device: str, precision: str, compile: bool = False) -> None:
    """bf16 autocast where asked (auto: on CUDA); channels_last weights and inputs for CNNs
    (measured on CPU too: EfficientNet-Lite0 train step 1.5x, inference 1.7x faster);
    optionally torch.compile the encoder in place (state-dict keys, hooks and deepcopy keep
    working; compiling takes ~45 s for EfficientNet on 2 CPU cores and did not pay off there)."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, not {precision!r}")
    bf16 = precision == "bf16" or (precision == "auto" and device == "cuda")
    encoder.autocast_dtype = torch.bfloat16 if bf16 else None
    if encoder.slice_layout == "nchw":
        encoder.channels_last = True
        encoder.to(memory_format=torch.channels_last)
    if compile:
        encoder.compile()


class ProgressPlugin(SupervisedPlugin):
    """Training progress per task, as an Avalanche plugin."""

    def __init__(self, task_names):
        super().__init__()
        self.task_names = list(task_names)
        self.bar = None

    def before_training_exp(self, strategy, **kwargs):
        t = strategy.experience.current_experience
        steps = len(strategy.dataloader) * strategy.train_epochs
        self.bar = progress.bar(total=steps, desc=f"train {self.task_names[t]}", leave=False, unit="step")

    def after_training_iteration(self, strategy, **kwargs):
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{strategy.loss.item():.3f}", refresh=False)

    def after_training_exp(self, strategy, **kwargs):
        self.bar.close()
        self.bar = None


class FiniteLossGuard(SupervisedPlugin):
    """Stops the run at the first NaN or infinite loss (after every plugin added its penalty),
    naming the task and step; the checkpoint of the last finished task stays as it was."""

    def __init__(self, task_names):
        super().__init__()
        self.task_names = list(task_names)

    def before_backward(self, strategy, **kwargs):
        loss = float(strategy.loss.detach())
        if not math.isfinite(loss):
            name, clock = self.task_names[strategy.experience.current_experience], strategy.clock
            raise CfbenchError(f"non-finite loss ({loss}) in task {name} at step {clock.train_epoch_iterations + 1} "
                               f"of epoch {clock.train_exp_epochs + 1}; stopped. The checkpoint after the last "
                               "finished task is unchanged: --resume continues from it (e.g. with a lower lr)")
