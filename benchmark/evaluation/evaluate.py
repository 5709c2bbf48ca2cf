"""Evaluation round after the pretrained model and after every task: zs, lp and head accuracies."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from tasks import TensorSplit
from tasks.compact import ImageStore, gather

from .. import progress
from .multihead import MultiHeadClassifier
from .probe import accuracy, expected_calibration_error, fit_official_probe, fit_probe

IMAGE_KINDS = ("lp", "head", "lp_ece")
TEXT_KINDS = ("zs", "zs_ece")


def matrix_kinds(has_text: bool) -> tuple[str, ...]:
    return (TEXT_KINDS[:1] + IMAGE_KINDS + TEXT_KINDS[1:]) if has_text else IMAGE_KINDS


@dataclass
class EvalDataset:
    name: str
    classes: Sequence[str]
    templates: Sequence[str]
    probe_train: TensorSplit  # capped per class, seeded
    test: TensorSplit
    probe_val: Optional[TensorSplit] = None  # the official probe chooses its lr here
    # the official probe's final fit: on the source's whole train split (ldifs_code heads.py:158-172, the
    # base dataset's train_loader), i.e. train + val where val is a hold-out from train, train alone where
    # the source fixes its own val split (EuroSAT's eurosat.py:27-28 train folder)
    refit_on_val: bool = True

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass
class RoundResult:
    """cells[kind][dataset] = value (None where undefined)."""

    cells: dict[str, dict[str, Optional[float]]] = field(default_factory=lambda: defaultdict(dict))


@torch.no_grad()
def extract_features(encoder: torch.nn.Module, x: "torch.Tensor | ImageStore", batch_size: int = 256,
                     device: str = "cpu") -> torch.Tensor:
    """Pooled features in large no-grad batches, returned on the CPU as float32."""
    was_training = encoder.training
    encoder.eval()
    out = [encoder(gather(x, slice(i, i + batch_size), device).to(device, non_blocking=True)).float().cpu()
           for i in range(0, len(x), batch_size)]
    encoder.train(was_training)
    return torch.cat(out) if out else torch.empty(0, getattr(encoder, "feature_dim", 0))


@torch.no_grad()
def zero_shot_weights(encoder, classes: Sequence[str], templates: Sequence[str], device: str = "cpu") -> torch.Tensor:
    """Per class: mean of the normalized text embeddings over the templates, renormalized."""
    rows = []
    for name in classes:
        tokens = encoder.tokenizer([t.format(name) for t in templates]).to(device)
        emb = F.normalize(encoder.encode_text(tokens).float(), dim=-1).mean(dim=0)
        rows.append(F.normalize(emb, dim=0))
    return torch.stack(rows).cpu()


def zero_shot_logits(features: torch.Tensor, weights: torch.Tensor, logit_scale: float = 100.0) -> torch.Tensor:
    return logit_scale * F.normalize(features, dim=-1) @ weights.T


@dataclass
class ZeroShotClassifier:
    """Normalized class embeddings and the logit scale they were made with."""

    weights: torch.Tensor
    logit_scale: float

    @classmethod
    def build(cls, encoder, ds: EvalDataset, device: str = "cpu") -> "ZeroShotClassifier":
        return cls(zero_shot_weights(encoder, ds.classes, ds.templates, device), encoder.logit_scale)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return zero_shot_logits(features, self.weights, self.logit_scale)


def probe_logits(settings, train: tuple[torch.Tensor, torch.Tensor], val: Optional[tuple[torch.Tensor, torch.Tensor]],
                 test_f: torch.Tensor, num_classes: int, seed: int, device: str, refit_on_val: bool = True) -> torch.Tensor:
    """Linear-probe logits on test features: settings.probe "sklearn" (C fixed, standardized
    features) or "official" (the LDIFS code's PyTorch probe, lr chosen on `val`, refitted on train
    and, with refit_on_val, val)."""
    if settings.probe == "official":
        if val is None:
            raise ValueError("the official probe needs a validation split")
        return fit_official_probe(*train, *val, num_classes, settings.probe_iterations, seed=seed,
                                  device=device, refit_on_val=refit_on_val).logits(test_f)
    return fit_probe(*train, num_classes, C=settings.probe_C, seed=seed).logits(test_f)


def evaluate_round(model: MultiHeadClassifier, datasets: list[EvalDataset], trained: dict[str, int],
                   settings, device: str = "cpu", seed: int = 0,
                   zero_shot: Optional[dict[str, ZeroShotClassifier]] = None, desc: str = "eval",
                   kinds: Optional[Sequence[str]] = None) -> RoundResult:
    """trained maps task name -> task label of every task whose head exists (head accuracy).
    settings: an EvalConfig; zero_shot: fixed classifiers per dataset (zs_text: pretrained), else
    the current text tower builds them. kinds: only these of zs, lp, head (and their ECEs); None:
    all. Only what they need is computed: zs and head read test features alone, lp also the probe's."""
    result = RoundResult()
    want = set(kinds) if kinds is not None else {"lp", "zs", "head"}
    encoder, batch_size = model.encoder, settings.batch_size
    for ds in progress.bar(datasets, desc=desc, leave=False, unit="dataset"):
        test_f = extract_features(encoder, ds.test.x, batch_size, device)
        if "lp" in want:
            train_f = extract_features(encoder, ds.probe_train.x, batch_size, device)
            val = None
            if settings.probe == "official":
                val = (extract_features(encoder, ds.probe_val.x, batch_size, device), ds.probe_val.y)
            logits = probe_logits(settings, (train_f, ds.probe_train.y), val, test_f, ds.num_classes, seed, device,
                                  ds.refit_on_val)
            result.cells["lp"][ds.name] = accuracy(logits, ds.test.y)
            result.cells["lp_ece"][ds.name] = expected_calibration_error(logits, ds.test.y)
        if encoder.has_text and "zs" in want:
            classifier = zero_shot[ds.name] if zero_shot else ZeroShotClassifier.build(encoder, ds, device)
            zs = classifier.logits(test_f)
            result.cells["zs"][ds.name] = accuracy(zs, ds.test.y)
            result.cells["zs_ece"][ds.name] = expected_calibration_error(zs, ds.test.y)
        if "head" in want:
            result.cells["head"][ds.name] = None
            if ds.name in trained:
                with torch.no_grad():
                    head_logits = model.head_logits(trained[ds.name], test_f.to(device)).cpu()
                result.cells["head"][ds.name] = accuracy(head_logits, ds.test.y)
    return result
