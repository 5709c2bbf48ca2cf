"""ZSCL (Zheng et al., ICCV 2023): distil the initial CLIP on a reference image set, an l2 pull
towards the previous task's weights, and weight ensembling. Needs a text tower. Exact to the
official code (Thunderbeee/ZSCL, mtil/src/models/finetune.py and helpers.py):

- every step draws the next batch of reference images (a shuffled pass, then another);
  logits = logit_scale.exp() * normalized image features @ the teacher's normalized embeddings of
  the reference texts, for the student and for the teacher (the pretrained CLIP);
  loss += weight * T^2 * CE(student/T, softmax(teacher/T))            (finetune.py:248-280)
  and, with text_loss, the same on the transposed logits (softmax over the batch's images for each
  reference text, still the teacher's text embeddings: finetune.py:283-290);
- l2: loss += l2 * sum ||theta - theta_task_start||^2 over the trained parameters (helpers.py:47-51);
- weight ensembling: after the optimizer step of every iteration i with i % avg_freq == 0
  (0-indexed: 0, 100, 200, ...), avg <- (avg * n + theta) / (n + 1), n = 1, 2, ..., where avg
  starts as the weights at the task's start (finetune.py:309-320, helpers.py:31-34); the average
  replaces the weights at the end of the task: it is evaluated and the next task starts from it.

Under DDP every rank draws the same reference batch; with the image-side loss alone each rank
takes its shard of it (the loss is a mean over its images); the text-side loss normalizes over the
batch's images, so with text_loss every rank computes it on the whole batch (its gradient, the
same on every rank, survives DDP's average unchanged). The weight ensembling is the same on every
rank: so are the weights it averages.

The teacher never changes and reference images are not augmented, so the teacher's image
features are computed once per reference sample (the first time it is drawn) and reused; the
reference texts' embeddings once per sequence.

ZSCL's LwF baseline (scripts/lwf.sh) is the same loss with teacher = the previous task's model
and the current task's images and class prompts as the reference set: `teacher="previous"`
with `reference_for(task) -> (images, texts)`. LwF-VR (scripts/lwf_vr.sh) replaces the prompts
by random token sequences (`virtual_vocab`); reference texts may be given as token tensors.
"""
from __future__ import annotations

import copy
import logging
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin

from benchmark.distributed import shard, shard_weight, share_out, world
from tasks.compact import gather

from . import read_captions, slice_store
from .context import BuildContext
from .l2sp import l2sp_penalty
from .references import class_prompts, reference_images, training_images

log = logging.getLogger("cfbench")


def virtual_vocab(tokenizer, generator: torch.Generator, length: int = 10, n_class: int = 1000) -> torch.Tensor:
    """n_class random token sequences: start token, `length` tokens uniform over the vocabulary, end
    token, zero padding to the context length (ZSCL mtil/src/models/helpers.py:54-62)."""
    vocab = getattr(tokenizer, "encoder", None)
    if vocab is None:
        raise ValueError("random-vocabulary texts need open_clip's BPE tokenizer (SimpleTokenizer)")
    context = getattr(tokenizer, "context_length", 77)
    texts = torch.randint(0, len(vocab), (n_class, length), generator=generator)
    start = torch.full((n_class, 1), vocab["<start_of_text>"])
    end = torch.full((n_class, 1), vocab["<end_of_text>"])
    zeros = torch.zeros((n_class, context - 2 - length), dtype=torch.long)
    return torch.cat([start, texts, end, zeros], dim=1)


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * mean over rows of -sum_k softmax(teacher/T)_k * log_softmax(student/T)_k."""
    target = F.softmax(teacher_logits / temperature, dim=1)
    return -(target * F.log_softmax(student_logits / temperature, dim=1)).sum(dim=1).mean() * temperature ** 2


class ZSCLPlugin(SupervisedPlugin):
    @property
    def checkpoint_attrs(self) -> tuple[str, ...]:
        """What --resume restores: the pretrained teacher and its text embeddings. A previous-task teacher
        (lwf-clip, lwf-vr) is the encoder itself when the next task starts, copied again there: the
        checkpoint carries no second model (a ViT-B/16 CLIP: 598 MB less in each state.pt)."""
        return ("teacher", "_text_embeddings") if self.teacher_source == "pretrained" else ()

    def __init__(self, reference_images: Optional[torch.Tensor] = None,
                 reference_texts: Union[Sequence[str], torch.Tensor] = (),
                 temperature: float = 2.0, weight: float = 1.0, text_loss: bool = False, l2: float = 0.0,
                 avg_freq: int = 100, ref_batch_size: int = 64, weight_ensemble: bool = True, seed: int = 0,
                 teacher: str = "pretrained", feature_budget_mb: float = 2048.0,
                 reference_for: Optional[Callable[[int], tuple[torch.Tensor, Union[list[str], torch.Tensor]]]] = None):
        super().__init__()
        if avg_freq < 1 or ref_batch_size < 1:
            raise ValueError("avg_freq and ref_batch_size must be positive")
        if teacher not in ("pretrained", "previous"):
            raise ValueError(f"teacher must be pretrained or previous, not {teacher!r}")
        self.teacher_source, self.reference_for = teacher, reference_for
        self.reference_images = reference_images
        self.reference_texts = reference_texts if isinstance(reference_texts, torch.Tensor) else list(reference_texts)
        self.temperature, self.weight, self.text_loss = float(temperature), float(weight), bool(text_loss)
        self.l2, self.avg_freq, self.ref_batch_size = float(l2), int(avg_freq), int(ref_batch_size)
        self.weight_ensemble, self.seed = bool(weight_ensemble), int(seed)
        self.feature_budget_mb = float(feature_budget_mb)
        self.teacher = None
        self._generator = torch.Generator()
        self._order: list[torch.Tensor] = []
        self._text_embeddings: Optional[torch.Tensor] = None
        self._teacher_features: Optional[torch.Tensor] = None  # per reference sample, filled on first use
        self._have_features: Optional[torch.Tensor] = None
        self.teacher_images = 0  # reference images the teacher has encoded (each at most once)
        self._start: Optional[dict[str, torch.Tensor]] = None
        self._average: Optional[dict[str, torch.Tensor]] = None
        self._count = 0
        self._iteration = 0
        self.last_penalty: Optional[torch.Tensor] = None
        self.last_reference_batch: Optional[torch.Tensor] = None
        self.merged_at: list[int] = []  # 0-indexed iterations of the current task that joined the average

    def before_training_exp(self, strategy, **kwargs):
        encoder = strategy.model.encoder
        if not getattr(encoder, "has_text", False):
            raise ValueError("ZSCL needs a model with a text tower (an open_clip CLIP)")
        if self.reference_for is not None:  # a reference set per task (LwF: the task's own data)
            self.reference_images, self.reference_texts = self.reference_for(strategy.experience.current_experience)
            self._text_embeddings = self._teacher_features = self._have_features = None
        if self.reference_images is None or len(self.reference_texts) == 0:
            raise ValueError("ZSCL needs reference_images and reference_texts")
        if self.teacher is None or self.teacher_source == "previous":
            # pretrained: the initial model, frozen for the whole sequence; previous: the model as
            # this task starts
            self.teacher = copy.deepcopy(encoder).eval().requires_grad_(False)
            if self.teacher_source == "previous":
                self._text_embeddings = self._teacher_features = self._have_features = None
        if self._text_embeddings is None:
            self._text_embeddings = self._encode_texts(strategy.device)
        self._iteration, self._count, self.merged_at = 0, 0, []
        # reference batches from a per-task generator: a resumed run draws the same ones
        self._generator.manual_seed(self.seed * 1000 + strategy.experience.current_experience)
        self._order = []
        trained = {k: p.detach().clone() for k, p in encoder.named_parameters() if p.requires_grad}
        self._start = trained if self.l2 > 0 else None
        self._average = {k: v.clone() for k, v in trained.items()} if self.weight_ensemble else None

    @torch.no_grad()
    def _encode_texts(self, device, batch: int = 256) -> torch.Tensor:
        """The teacher's normalized embeddings of the reference texts (strings, or token tensors)."""
        out: list[torch.Tensor] = []

        def encode(k: int) -> torch.Tensor:
            chunk = self.reference_texts[k * batch:(k + 1) * batch]
            tokens = chunk if isinstance(chunk, torch.Tensor) else self.teacher.tokenizer(chunk)
            return F.normalize(self.teacher.encode_text(tokens.to(device)).float(), dim=-1).cpu()

        # under DDP each chunk is encoded by one rank, in the chunks of one process
        share_out(-(-len(self.reference_texts) // batch), encode, lambda _k, e: out.append(e))
        return torch.cat(out).to(device)

    def _next_indices(self) -> torch.Tensor:
        """The next reference batch of a shuffled pass over the set (a new pass when it runs out;
        the last batch of a pass may be smaller, as a DataLoader's)."""
        if not self._order:
            perm = torch.randperm(len(self.reference_images), generator=self._generator)
            self._order = list(perm.split(self.ref_batch_size))
        return self._order.pop(0)

    @torch.no_grad()
    def _teacher_image_features(self, index: torch.Tensor, device) -> torch.Tensor:
        """The teacher's normalized features of reference images `index` (the global batch): each
        image is encoded at most once per run (kept within feature_budget_mb; beyond it, once per
        draw), and under DDP shared out among the ranks."""
        if self._have_features is None:
            # float32 within feature_budget_mb, else float16 (ImageNet's 1.28 M x 512: 2.6 GB -> 1.3 GB;
            # the features are unit vectors, float16 keeps 11 significant bits), else memory-mapped
            example = self._text_embeddings[:1].cpu()
            stores = slice_store.allocate(len(self.reference_images), [example], "auto", self.feature_budget_mb)
            self._teacher_features = stores[0] if stores else None
            self._have_features = torch.zeros(len(self.reference_images), dtype=torch.bool)
            log.info("ZSCL: teacher features of %d reference images kept as %s", len(self.reference_images),
                     "none (computed every step)" if stores is None else stores[0].dtype)
        if self._teacher_features is None:
            return self._encode_images(index, device).to(device)
        missing = index[~self._have_features[index]]
        if len(missing):
            self._teacher_features[missing] = self._encode_images(missing, device).to(self._teacher_features.dtype)
            self._have_features[missing] = True
        return self._teacher_features[index].to(device, non_blocking=True).float()

    def _encode_images(self, index: torch.Tensor, device) -> torch.Tensor:
        """Normalized teacher features (CPU, float32) of reference images `index`: one batch in one
        process; N contiguous parts, one a rank, gathered, under DDP."""
        out = torch.empty(len(index), self._text_embeddings.shape[1])
        part = -(-len(index) // world().size)

        def encode(k: int) -> torch.Tensor:
            mine = index[k * part:(k + 1) * part]
            self.teacher_images += len(mine)
            x = gather(self.reference_images, mine, device).to(device, non_blocking=True)
            return F.normalize(self.teacher(x).float(), dim=-1).cpu()

        share_out(-(-len(index) // part), encode, lambda k, f: out.__setitem__(slice(k * part, k * part + len(f)), f))
        return out

    def penalty(self, student, teacher_features: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        scale = student.clip.logit_scale.exp().float()
        texts = self._text_embeddings
        teacher_logits = scale * teacher_features @ texts.T
        student_logits = scale * F.normalize(student(x).float(), dim=-1) @ texts.T
        loss = self.weight * soft_cross_entropy(student_logits, teacher_logits, self.temperature)
        if self.text_loss:
            loss = loss + soft_cross_entropy(student_logits.T, teacher_logits.T, self.temperature)
        return loss

    def before_backward(self, strategy, **kwargs):
        index = self._next_indices()
        teacher = self._teacher_image_features(index, strategy.device)
        weight = 1.0
        if not self.text_loss and world().active:  # the image-side loss is a mean over reference images: sharded
            part = shard(len(index))
            weight, index, teacher = shard_weight(len(index)), index[part], teacher[part]
        x = gather(self.reference_images, index, strategy.device).to(strategy.device, non_blocking=True)
        self.last_reference_batch = x
        encoder = strategy.model.encoder
        penalty = self.penalty(encoder, teacher, x) * weight
        if self._start is not None:
            penalty = penalty + self.l2 * l2sp_penalty(encoder, self._start)
        self.last_penalty = penalty.detach()
        strategy.loss += penalty

    @torch.no_grad()
    def after_training_iteration(self, strategy, **kwargs):
        if self._average is not None and self._iteration % self.avg_freq == 0:
            self._count += 1
            for k, p in strategy.model.encoder.named_parameters():
                if k in self._average:
                    self._average[k].mul_(self._count).add_(p.detach()).div_(self._count + 1)
            self.merged_at.append(self._iteration)
        self._iteration += 1

    @torch.no_grad()
    def after_training_exp(self, strategy, **kwargs):
        if self._average is not None and self._count > 0:
            for k, p in strategy.model.encoder.named_parameters():
                if k in self._average:
                    p.copy_(self._average[k])
        self._average = self._start = None


def build(ctx: BuildContext, reference_task: str, reference_texts: Optional[str], **kw) -> list:
    """ZSCL. Reference images: the task's train split (not augmented); reference texts: a captions
    file (one per line, e.g. Conceptual Captions' validation captions as in the official code) or,
    without one, the reference task's class prompts (announced in the log)."""
    if reference_texts:
        texts = read_captions(reference_texts)
    else:
        texts = class_prompts(ctx, reference_task)
        log.info("ZSCL: no reference_texts file given; the reference texts are %d class prompts of %s",
                 len(texts), reference_task)
    # the reference task's whole train split: ZSCL's ImageNet train folder (finetune.py:140-145 ->
    # datasets/imagenet.py:30-43), no validation hold-out taken out of it
    return [ZSCLPlugin(reference_images=reference_images(ctx, reference_task, "trainval"), reference_texts=texts,
                       seed=ctx.seed, **kw)]


def build_lwf_clip(ctx: BuildContext, random_texts: bool = False, **kw) -> list:
    """ZSCL's LwF baseline: the ZSCL loss with the previous task's model as teacher, on the current
    task's images as it trains on them (lwf.sh: its train loader; not augmented) and class prompts
    (templates[0] per class); LwF-VR (`random_texts`): random token sequences instead of the
    prompts (ZSCL's --ref-sentences random), drawn anew for each task."""
    generator = torch.Generator()

    def reference_for(t: int):
        name = ctx.tasks[t]
        if random_texts:
            generator.manual_seed(ctx.seed * 1000 + t)
            return training_images(ctx, name), virtual_vocab(ctx.tokenizer, generator)
        return training_images(ctx, name), class_prompts(ctx, name)

    return [ZSCLPlugin(teacher="previous", reference_for=reference_for, l2=0.0, weight_ensemble=False,
                       seed=ctx.seed, **kw)]


def build_lwf_vr(ctx: BuildContext, **kw) -> list:
    return build_lwf_clip(ctx, random_texts=True, **kw)
