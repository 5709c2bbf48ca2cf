"""iCaRL as ZSCL's MTIL baseline (Table 3 row "iCaRL"), exact to the official code
(Thunderbeee/ZSCL, mtil/, commit b96e714: src/models/icarl.py, src/dynamic_dataset.py,
src/args.py, scripts/icarl.sh). Needs a text tower. What the official code does:

- memory (dynamic_dataset.py): a budget K = --memory_size = 10000 images (args.py:110), kept per
  *dataset* (task), never per class. Only the first 30,000 training samples of a task are ever
  candidates (getNewDataset, :92-99), taken in the dataset's order with the test transform (no
  augmentation). After the first task: its first K samples, no selection (update, :23-26). After
  task t >= 2 (t = tasks seen, this one included): every older task's exemplars are cut to their
  first K // t (reduceExampleSet, :32-37), then herding picks K - K // t exemplars of the new task
  (constructExampleSet, :39-82; so the memory holds K + (t - 2) * (K // t) images, not K), with the
  model just trained on it (update loads the task's checkpoint, :28): features = encode_image,
  L2-normalized (:44-55), mu = their mean (:57); pick k = 0, 1, ... is the argmin over the features
  still in the array of ||mu - (f + s) / (k + 1)||^2, s = the sum of the picked features (:64-80),
  and the picked feature leaves the array (np.delete). The image stored is `new_dataset[index]`
  with `index` counted in that shrinking array, not in the dataset (:70, :79): after the first pick
  the stored image is in general not the one whose feature was picked (it can even repeat).
  `selection: official` does exactly that; `selection: herding` stores the picked images (iCaRL as
  published).
- training (icarl.py:18-44, 46-238): the memory as it was after the previous task (icarl.py:37,
  :44), concatenated task after task (dynamic_dataset.py:101-107), is read in order in batches of
  --batch-size = 64 (helpers.py:11-14 `batch`), starting over when it runs out (icarl.py:127,
  171-175): no shuffling. Exemplars never enter the cross-entropy, which is the current task's text
  classifier alone (icarl.py:105-106, 156-166). Each step adds ZSCL's distillation on the exemplar
  batch (icarl.py:179-221, line for line finetune.py:248-290): teacher = the *pretrained* CLIP (no
  --ref-model: icarl.py:113-115), texts = the current task's class prompts, template(class)
  (icarl.py:61-64, 105-106, 129), embedded by the teacher; logits = logit_scale.exp() x normalized
  image features (student / teacher) @ those embeddings; loss += weight * T^2 *
  CE(student/T, softmax(teacher/T)) (--image_loss) and, with text_loss, the same on the transposed
  logits (--text_loss); T = 2 (args.py:103). The first task is plain fine-tuning (icarl.py:30).

What scripts/icarl.sh leaves out (the README's zscl-mtil table says what cfbench runs instead):
it passes neither --image_loss nor --text_loss, so as committed the distillation is computed and
never added (icarl.py:207-221: the run is fine-tuning); nor --ls 0.2; and --iterations 5, a smoke
setting. Table 3's iCaRL row is not fine-tuning's, so the loss was on: `weight` 1 and `text_loss`
as lwf.sh and ZSCL.sh pass them (--image_loss --text_loss).

cfbench keeps the memory as positions in the images each task trains on (its `train.split` as
capped by `train.max_train_per_class`: cached, un-augmented), so the checkpoint holds a few
integer tensors, and reads the images back from the cache. Teacher image features are cached per exemplar within a task (the
teacher is frozen and exemplars are not augmented, as in ZSCL). Herding features are extracted in
batches (the official: one image at a time) and not after the last task (the official builds a
memory nothing uses).
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from tasks.compact import ImageStore, gather

from .context import BuildContext
from .references import class_prompts, training_images
from .zscl import ZSCLPlugin

SELECTIONS = ("official", "herding")


def herding(features: Tensor, m: int, selection: str = "official") -> Tensor:
    """Positions of min(m, n) exemplars among n L2-normalized `features`, in picking order
    (dynamic_dataset.py:57-80): the k-th pick minimizes ||mu - (f + s) / (k + 1)||^2 over the
    features not picked yet, s the sum of the picked ones. `official` returns what the released code
    stores: the pick's position among the features still in its (shrinking) array; `herding` the
    pick's position in `features`."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, not {selection!r}")
    n = len(features)
    mean = features.mean(dim=0)                                            # :57
    left = torch.ones(n, dtype=torch.bool, device=features.device)
    total = torch.zeros_like(mean)
    picks = []
    for k in range(min(m, n)):                                             # :64
        # :66-68 (k = 0: (f + 0) * 1 = f exactly) and :73-77
        distance = ((mean - (1 / (k + 1)) * (features + total)) ** 2).sum(dim=1)
        distance[~left] = math.inf  # np.delete (:71, :80); argmin keeps the first of equal values
        chosen = int(distance.argmin())
        picks.append(int(left[:chosen].sum()) if selection == "official" else chosen)   # :70, :79
        total += features[chosen]                                          # :69, :78
        left[chosen] = False
    return torch.tensor(picks, dtype=torch.long)


class ExemplarImages(ImageStore):
    """The memory read as one image set: task 0's exemplars, then task 1's, ...
    (dynamic_dataset.py:101-107); `parts[j]` = (task j's images, positions of its exemplars)."""

    def __init__(self, parts: Sequence[tuple[Union[Tensor, ImageStore], Tensor]]):
        self.parts = [(images, positions.long()) for images, positions in parts]
        self.side = int(self.parts[0][0].shape[-1]) if self.parts else 0
        sizes = [len(p) for _, p in self.parts]
        self.owner = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes, dtype=torch.long))
        self.local = torch.cat([p for _, p in self.parts]) if self.parts else torch.zeros(0, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.local)

    def gather(self, idx, device: Union[str, torch.device] = "cpu") -> Tensor:
        pos = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        owner, local = self.owner[pos], self.local[pos]
        out = torch.empty((len(pos), 3, self.side, self.side), dtype=torch.uint8, device=device)
        for j in owner.unique().tolist():
            rows = torch.nonzero(owner == j).flatten()
            out[rows.to(out.device)] = gather(self.parts[j][0], local[rows], device).to(out.device)
        return out


class ICaRLPlugin(ZSCLPlugin):
    """ZSCL's iCaRL (module docstring). images_of(t): the images task t trains on (tensor or
    compact store); prompts_of(t): its class prompts; num_tasks: the sequence's length (no memory is
    built after the last task). `memory[j]`: the exemplars of task j as positions in images_of(j),
    in picking order (tensors: `--resume` restores them exactly)."""

    checkpoint_attrs = ("teacher", "memory")

    def __init__(self, images_of: Optional[Callable[[int], Union[Tensor, ImageStore]]] = None,
                 prompts_of: Optional[Callable[[int], list[str]]] = None, num_tasks: Optional[int] = None,
                 memory_size: int = 10000, max_candidates: int = 30000, selection: str = "official",
                 temperature: float = 2.0, weight: float = 1.0, text_loss: bool = True, ref_batch_size: int = 64):
        if memory_size < 1 or max_candidates < 1:
            raise ValueError("memory_size and max_candidates must be positive")
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, not {selection!r}")
        super().__init__(temperature=temperature, weight=weight, text_loss=text_loss, l2=0.0,
                         ref_batch_size=ref_batch_size, weight_ensemble=False, teacher="pretrained",
                         reference_for=self._exemplars_for)
        self.images_of, self.prompts_of, self.num_tasks = images_of, prompts_of, num_tasks
        self.memory_size, self.max_candidates, self.selection = int(memory_size), int(max_candidates), selection
        self.memory: list[Tensor] = []
        self.active = False  # whether this task distils (the first has no memory)
        self._images: dict[int, Union[Tensor, ImageStore]] = {}

    def check_restored(self, completed: int) -> Optional[str]:
        """What a resumed memory must be (a checkpoint from elsewhere is checked before use): at most
        one exemplar set per finished task, each distinct positions inside that task's train split."""
        if not isinstance(self.memory, list) or len(self.memory) > completed:
            return f"iCaRL's memory must list at most {completed} task(s)' exemplars"
        for j, positions in enumerate(self.memory):
            if not (isinstance(positions, Tensor) and positions.dim() == 1 and not positions.is_floating_point()
                    and not positions.is_complex() and positions.dtype != torch.bool):
                return f"iCaRL's memory[{j}] must be a list of image positions"
            n = len(self._task_images(j))
            if len(positions) and (int(positions.min()) < 0 or int(positions.max()) >= n):
                return f"iCaRL's memory[{j}] names images outside task {j}'s {n} training images"
            if len(torch.unique(positions)) != len(positions):
                return f"iCaRL's memory[{j}] names an image twice"
        return None

    def _task_images(self, t: int):
        if t not in self._images:
            self._images[t] = self.images_of(t)
        return self._images[t]

    def _exemplars_for(self, t: int):
        parts = [(self._task_images(j), positions) for j, positions in enumerate(self.memory)]
        return ExemplarImages(parts), list(self.prompts_of(t))

    def before_training_exp(self, strategy, **kwargs):
        encoder = strategy.model.encoder
        if not getattr(encoder, "has_text", False):
            raise ValueError("iCaRL (ZSCL's) needs a model with a text tower (an open_clip CLIP)")
        if self.teacher is None:  # the pretrained CLIP (icarl.py:113-115), taken before anything trains
            self.teacher = copy.deepcopy(encoder).eval().requires_grad_(False)
        self.active = sum(len(m) for m in self.memory) > 0  # the first task: plain fine-tuning (icarl.py:30)
        if self.active:
            super().before_training_exp(strategy, **kwargs)

    def _next_indices(self) -> Tensor:
        """The memory in order, `ref_batch_size` at a time, from the start again when it runs out
        (helpers.py:11-14; icarl.py:127, 171-175); each task starts at the beginning."""
        if not self._order:
            self._order = list(torch.arange(len(self.reference_images)).split(self.ref_batch_size))
        return self._order.pop(0)

    def before_backward(self, strategy, **kwargs):
        if self.active:
            super().before_backward(strategy, **kwargs)

    def after_training_iteration(self, strategy, **kwargs):
        if self.active:
            super().after_training_iteration(strategy, **kwargs)

    def after_training_exp(self, strategy, **kwargs):
        if self.active:
            super().after_training_exp(strategy, **kwargs)
        t = strategy.experience.current_experience
        if self.num_tasks is not None and t + 1 >= self.num_tasks:
            return  # after the last task the official builds a memory nothing reads
        self.update_memory(strategy, t)

    @torch.no_grad()
    def update_memory(self, strategy, t: int) -> None:
        """DynamicDataset.update after task t (icarl.py:31, 44; dynamic_dataset.py:21-30)."""
        if len(self.memory) != t:
            raise ValueError(f"iCaRL: the memory holds {len(self.memory)} task(s) after task {t + 1}")
        images = self._task_images(t)
        candidates = min(len(images), self.max_candidates)  # the first 30,000 (dynamic_dataset.py:92-99)
        K = self.memory_size
        if t == 0:  # first round: the first K samples (:23-26)
            self.memory = [torch.arange(min(candidates, K))]
            return
        seen = len(self.memory) + 1  # len(ref_names) + 1 (:34) = len(ref_names) after the append (:42, :59)
        self.memory = [m[:K // seen].clone() for m in self.memory]  # reduceExampleSet (:32-37)
        features = self._features(strategy.model.encoder, images, candidates, strategy.eval_mb_size, strategy.device)
        features = features / features.norm(dim=-1, keepdim=True)  # :55
        self.memory.append(herding(features, K - K // seen, self.selection))  # :59-82

    @staticmethod
    def _features(encoder, images, n: int, batch: int, device) -> Tensor:
        """encode_image of images[:n] with the model as trained (dynamic_dataset.py:28, 44-54), float32."""
        was_training = encoder.training
        encoder.eval()
        out = [encoder(gather(images, slice(i, min(i + batch, n)), device).to(device, non_blocking=True)).float()
               for i in range(0, n, batch)]
        encoder.train(was_training)
        return torch.cat(out)


def build(ctx: BuildContext, **kw) -> list:
    """Exemplars: positions in the images each task trains on (`train.split` as capped, cached and
    un-augmented); distillation texts: the current task's class prompts."""
    return [ICaRLPlugin(images_of=lambda t: training_images(ctx, ctx.tasks[t]),
                        prompts_of=lambda t: class_prompts(ctx, ctx.tasks[t]), num_tasks=len(ctx.tasks), **kw)]
