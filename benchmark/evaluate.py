"""Evaluation round after the pretrained model and after every task: zs, lp and head accuracies."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from tasks import TensorSplit

from .multihead import MultiHeadClassifier
from .probe import accuracy, expected_calibration_error, fit_probe

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

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass
class RoundResult:
    """cells[kind][dataset] = value (None where undefined)."""

    cells: dict[str, dict[str, Optional[float]]] = field(default_factory=lambda: defaultdict(dict))


@torch.no_grad()
def extract_features(encoder: torch.nn.Module, x: torch.Tensor, batch_size: int = 256,
                     device: str = "cpu") -> torch.Tensor:
    """Pooled features in large no-grad batches, returned on the CPU as float32."""
    was_training = encoder.training
    encoder.eval()
    out = [encoder(x[i:i + batch_size].to(device, non_blocking=True)).float().cpu()
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


def evaluate_round(model: MultiHeadClassifier, datasets: list[EvalDataset], trained: dict[str, int],
                   device: str = "cpu", batch_size: int = 256, lp_C: float = 1.0, seed: int = 0,
                   desc: str = "eval") -> RoundResult:
    """trained maps task name -> task label of every task whose head exists (head accuracy)."""
    result = RoundResult()
    encoder = model.encoder
    for ds in tqdm(datasets, desc=desc, leave=False, unit="dataset"):
        train_f = extract_features(encoder, ds.probe_train.x, batch_size, device)
        test_f = extract_features(encoder, ds.test.x, batch_size, device)
        logits = fit_probe(train_f, ds.probe_train.y, ds.num_classes, C=lp_C, seed=seed).logits(test_f)
        result.cells["lp"][ds.name] = accuracy(logits, ds.test.y)
        result.cells["lp_ece"][ds.name] = expected_calibration_error(logits, ds.test.y)
        if encoder.has_text:
            zs = zero_shot_logits(test_f, zero_shot_weights(encoder, ds.classes, ds.templates, device))
            result.cells["zs"][ds.name] = accuracy(zs, ds.test.y)
            result.cells["zs_ece"][ds.name] = expected_calibration_error(zs, ds.test.y)
        result.cells["head"][ds.name] = None
        if ds.name in trained:
            head = model.heads[str(trained[ds.name])]
            with torch.no_grad():
                head_logits = head(test_f.to(head.linear.weight.device)).cpu()
            result.cells["head"][ds.name] = accuracy(head_logits, ds.test.y)
    return result
