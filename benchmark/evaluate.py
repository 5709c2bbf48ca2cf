"""Evaluation round after the pretrained model and after every task: lp and head accuracies."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from tqdm.auto import tqdm

from tasks import TensorSplit

from .multihead import MultiHeadClassifier
from .probe import LinearProbe, accuracy, expected_calibration_error, fit_probe


@dataclass
class EvalDataset:
    name: str
    num_classes: int
    probe_train: TensorSplit  # capped per class, seeded
    test: TensorSplit


@dataclass
class RoundResult:
    lp: dict[str, float] = field(default_factory=dict)
    lp_ece: dict[str, float] = field(default_factory=dict)
    head: dict[str, Optional[float]] = field(default_factory=dict)
    probes: dict[str, LinearProbe] = field(default_factory=dict)


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


def evaluate_round(model: MultiHeadClassifier, datasets: list[EvalDataset], trained: dict[str, int],
                   device: str = "cpu", batch_size: int = 256, lp_C: float = 1.0, seed: int = 0,
                   desc: str = "eval") -> RoundResult:
    """trained maps task name -> task label of every task whose head exists (head accuracy)."""
    result = RoundResult()
    for ds in tqdm(datasets, desc=desc, leave=False, unit="dataset"):
        train_f = extract_features(model.encoder, ds.probe_train.x, batch_size, device)
        test_f = extract_features(model.encoder, ds.test.x, batch_size, device)
        probe = fit_probe(train_f, ds.probe_train.y, ds.num_classes, C=lp_C, seed=seed)
        logits = probe.logits(test_f)
        result.probes[ds.name] = probe
        result.lp[ds.name] = accuracy(logits, ds.test.y)
        result.lp_ece[ds.name] = expected_calibration_error(logits, ds.test.y)
        if ds.name in trained:
            head = model.heads[str(trained[ds.name])]
            with torch.no_grad():
                head_logits = head(test_f.to(head.mean.device)).cpu()
            result.head[ds.name] = accuracy(head_logits, ds.test.y)
        else:
            result.head[ds.name] = None
    return result
