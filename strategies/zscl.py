"""ZSCL (Zheng et al., ICCV 2023): distil the initial CLIP on a reference image set, plus
weight ensembling. Needs a text tower (the teacher's text embeddings make the logits).

Each step draws a batch of reference images; logits = logit_scale * normalized image features
@ the teacher's normalized text embeddings of the reference texts (here: the reference set's
class prompts, the accepted substitute for Conceptual Captions). Loss += T^2 * soft
cross-entropy(teacher || student) at temperature T, optionally the same on the transposed
(text-side) logits with the student's text tower. Every `avg_freq` iterations the weights join a
running average, which replaces the weights at the end of the task (the evaluated model).
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * mean over rows of -sum_k softmax(teacher/T)_k * log_softmax(student/T)_k."""
    target = F.softmax(teacher_logits / temperature, dim=1)
    return -(target * F.log_softmax(student_logits / temperature, dim=1)).sum(dim=1).mean() * temperature ** 2


class ZSCLPlugin(SupervisedPlugin):
    checkpoint_attrs = ("teacher", "_text_embeddings")

    def __init__(self, reference_images: Optional[torch.Tensor] = None, reference_texts: Sequence[str] = (),
                 temperature: float = 2.0, weight: float = 1.0, text_loss: bool = False, avg_freq: int = 100,
                 ref_batch_size: int = 64, weight_ensemble: bool = True, seed: int = 0):
        super().__init__()
        self.reference_images, self.reference_texts = reference_images, list(reference_texts)
        self.temperature, self.weight, self.text_loss = float(temperature), float(weight), text_loss
        self.avg_freq, self.ref_batch_size, self.weight_ensemble = int(avg_freq), int(ref_batch_size), weight_ensemble
        self.teacher = None
        self.seed = int(seed)
        self._generator = torch.Generator()
        self._text_embeddings: Optional[torch.Tensor] = None
        self._average: Optional[dict[str, torch.Tensor]] = None
        self._count = 0
        self._iteration = 0
        self.last_penalty: Optional[torch.Tensor] = None
        self.last_reference_batch: Optional[torch.Tensor] = None

    def before_training_exp(self, strategy, **kwargs):
        encoder = strategy.model.encoder
        if not getattr(encoder, "has_text", False):
            raise ValueError("ZSCL needs a model with a text tower (an open_clip CLIP)")
        if self.reference_images is None or not self.reference_texts:
            raise ValueError("ZSCL needs reference_images and reference_texts")
        if self.teacher is None:  # the initial pretrained model, frozen for the whole sequence
            self.teacher = copy.deepcopy(encoder).eval().requires_grad_(False)
        if self._text_embeddings is None:
            with torch.no_grad():
                tokens = self.teacher.tokenizer(self.reference_texts).to(strategy.device)
                self._text_embeddings = F.normalize(self.teacher.encode_text(tokens).float(), dim=-1)
        self._iteration, self._count = 0, 0
        # reference batches from a per-task generator: a resumed run draws the same ones
        self._generator.manual_seed(self.seed * 1000 + strategy.experience.current_experience)
        self._average = ({k: p.detach().clone() for k, p in strategy.model.named_parameters()}
                         if self.weight_ensemble else None)

    def _reference_batch(self, device) -> torch.Tensor:
        index = torch.randint(0, len(self.reference_images), (self.ref_batch_size,), generator=self._generator)
        return self.reference_images[index].to(device, non_blocking=True)

    def penalty(self, student, x: torch.Tensor) -> torch.Tensor:
        scale = float(self.teacher.clip.logit_scale.exp())
        texts = self._text_embeddings
        with torch.no_grad():
            teacher_img = F.normalize(self.teacher(x).float(), dim=-1)
            teacher_logits = scale * teacher_img @ texts.T
        student_img = F.normalize(student(x).float(), dim=-1)
        loss = soft_cross_entropy(scale * student_img @ texts.T, teacher_logits, self.temperature)
        if self.text_loss:
            tokens = student.tokenizer(self.reference_texts).to(x.device)
            student_txt = F.normalize(student.encode_text(tokens).float(), dim=-1)
            loss = loss + soft_cross_entropy(scale * student_txt @ teacher_img.T, teacher_logits.T, self.temperature)
        return loss

    def before_backward(self, strategy, **kwargs):
        x = self._reference_batch(strategy.device)
        self.last_reference_batch = x
        penalty = self.penalty(strategy.model.encoder, x)
        self.last_penalty = penalty.detach()
        strategy.loss += self.weight * penalty

    @torch.no_grad()
    def after_training_iteration(self, strategy, **kwargs):
        self._iteration += 1
        if self._average is not None and self._iteration % self.avg_freq == 0:
            self._count += 1  # as ZSCL's merge_we: avg = (avg * n + theta) / (n + 1), n = 1, 2, ...
            for k, p in strategy.model.named_parameters():
                if k in self._average:
                    self._average[k].mul_(self._count).add_(p.detach()).div_(self._count + 1)

    @torch.no_grad()
    def after_training_exp(self, strategy, **kwargs):
        if self._average is not None and self._count > 0:
            for k, p in strategy.model.named_parameters():
                if k in self._average:
                    p.copy_(self._average[k])
        self._average = None
