"""Linear probes (scikit-learn logistic regression) and calibration error."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler


@dataclass
class LinearProbe:
    """logits = ((features - mean) / scale) @ weight.T + bias: standardization kept apart from
    the linear map so that a head initialised from it trains as well conditioned as the fit."""

    mean: torch.Tensor
    scale: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return ((features - self.mean) / self.scale) @ self.weight.T + self.bias


def fit_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, C: float = 1.0,
              max_iter: int = 1000, seed: int = 0) -> LinearProbe:
    """Logistic regression (lbfgs) on standardized features."""
    x = features.double().numpy()
    y = labels.numpy()
    scaler = StandardScaler().fit(x)
    clf = LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
    clf.fit(scaler.transform(x), y)
    weight, bias = _softmax_parameters(clf, num_classes)
    as_t = lambda a: torch.from_numpy(np.asarray(a)).float()  # noqa: E731
    return LinearProbe(as_t(scaler.mean_), as_t(scaler.scale_), weight, bias)


def _softmax_parameters(clf: LogisticRegression, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(num_classes, D) weights and biases of a fitted sklearn model as one softmax layer."""
    coef, intercept = clf.coef_, clf.intercept_
    if coef.shape[0] == 1:  # binary: sklearn returns one row; softmax over [0, z] is the same model
        coef = np.vstack([np.zeros_like(coef), coef])
        intercept = np.array([0.0, intercept[0]])
    weight = np.zeros((num_classes, coef.shape[1]))
    bias = np.full(num_classes, -1e4)  # a class absent from the fit is never predicted
    weight[clf.classes_] = coef
    bias[clf.classes_] = intercept
    return torch.from_numpy(weight).float(), torch.from_numpy(bias).float()


HEAD_CS = (1e-2, 1.0, 1e2, 1e4, 1e6)


def fit_normalized_head(train_f: torch.Tensor, train_y: torch.Tensor, val_f: torch.Tensor, val_y: torch.Tensor,
                        num_classes: int, Cs=HEAD_CS, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """LP-init as the official LDIFS code: logistic regression on L2-normalized features, C chosen
    on the validation split. Returns (weight, bias, C) for logits = W f/||f|| + b."""
    def unit(f: torch.Tensor) -> np.ndarray:
        return torch.nn.functional.normalize(f.double(), dim=1).numpy()

    x, xv, y, yv = unit(train_f), unit(val_f), train_y.numpy(), val_y.numpy()
    best = None
    for C in Cs:
        clf = LogisticRegression(C=C, max_iter=1000, random_state=seed).fit(x, y)
        score = clf.score(xv, yv)
        if best is None or score > best[0]:
            best = (score, C, clf)
    _, C, clf = best
    return (*_softmax_parameters(clf, num_classes), C)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * (logits.argmax(dim=1) == labels).double().mean().item()


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """ECE in percent with equal-width confidence bins, (lo, hi] as in Guo et al. 2017."""
    probs = logits.double().softmax(dim=1)
    conf, pred = probs.max(dim=1)
    correct = (pred == labels).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    ece = torch.zeros((), dtype=torch.float64)
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.double().mean() * (conf[in_bin].mean() - correct[in_bin].mean()).abs()
    return 100.0 * ece.item()
