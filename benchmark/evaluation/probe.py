"""Linear probes (scikit-learn's logistic regression, or the official LDIFS code's PyTorch one)
and calibration error."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits
from torch import nn

# scikit-learn's fits run on one BLAS thread. lbfgs's gradients round differently with the number of
# BLAS threads, and where a fit does not converge (a large C on separable features) that difference
# grows: the LP-init's C choice flipped between 1e-2 and 1e6 with the cores a process had (one
# process vs two DDP ranks of the demo protocol). A probe must not depend on the machine's cores.
_ONE_BLAS_THREAD = 1


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

    def to(self, device: str) -> "LinearProbe":
        return self  # its logits are computed on the CPU, as scikit-learn fitted it


def fit_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, C: float = 1.0,
              max_iter: int = 1000, seed: int = 0) -> LinearProbe:
    """Logistic regression (lbfgs) on standardized features."""
    x = features.double().numpy()
    y = labels.numpy()
    scaler = StandardScaler().fit(x)
    clf = LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
    with threadpool_limits(_ONE_BLAS_THREAD):
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
        with threadpool_limits(_ONE_BLAS_THREAD):
            clf = LogisticRegression(C=C, max_iter=1000, random_state=seed).fit(x, y)
            score = clf.score(xv, yv)
        if best is None or score > best[0]:
            best = (score, C, clf)
    _, C, clf = best
    return (*_softmax_parameters(clf, num_classes), C)


OFFICIAL_LRS = (0.01, 0.05, 0.1, 0.5, 1.0)  # ldifs_code model/heads.py:101


@dataclass
class NormalizedProbe:
    """logits = f / ||f|| @ weight.T + bias (the official code's ClassificationHead, normalize=True)."""

    weight: torch.Tensor
    bias: torch.Tensor
    lr: float

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        f = features.to(self.weight.device, torch.float32)
        return F.linear(f / f.norm(dim=-1, keepdim=True), self.weight, self.bias).cpu()

    def to(self, device: str) -> "NormalizedProbe":
        return NormalizedProbe(self.weight.to(device), self.bias.to(device), self.lr)


def _fit_torch_lr(features: torch.Tensor, labels: torch.Tensor, num_classes: int, lr: float, iterations: int,
                  device: str) -> NormalizedProbe:
    """Full-batch AdamW (torch defaults but lr) on cross-entropy from nn.Linear's default init, as
    ldifs_code model/logistic_regression.py:10-36 (the init draws from the global RNG on the CPU)."""
    init = nn.Linear(features.shape[1], num_classes)
    nn.Linear(features.shape[1], num_classes)  # ClassificationHead's own (overwritten) init draws too: same RNG stream
    weight = nn.Parameter(init.weight.detach().clone().to(device))
    bias = nn.Parameter(init.bias.detach().clone().to(device))
    optimizer = torch.optim.AdamW([weight, bias], lr=lr)
    # one copy on the device, normalized in place (the official head normalizes every iteration: same
    # values); on ImageNet a second copy would hold 2.4 GiB of its 19
    x = features.to(device, torch.float32, copy=True)
    x /= x.norm(dim=-1, keepdim=True)
    y = labels.to(device)
    with torch.enable_grad():
        for _ in range(iterations):
            optimizer.zero_grad()
            F.cross_entropy(F.linear(x, weight, bias), y).backward()
            optimizer.step()
    return NormalizedProbe(weight.detach(), bias.detach(), lr)


@dataclass
class OfficialSelection:
    """The official probe's lr search: the chosen lr, and the forked RNG after the search, from which
    the final fit draws its init (so a refit from a kept selection equals the whole procedure)."""

    lr: float
    rng_state: torch.Tensor


def select_official_lr(train_f: torch.Tensor, train_y: torch.Tensor, val_f: torch.Tensor, val_y: torch.Tensor,
                       num_classes: int, iterations: int = 1000, lrs=OFFICIAL_LRS, seed: int = 0,
                       device: str = "cpu") -> OfficialSelection:
    """ldifs_code model/heads.py:90-113: one fit per lr on the train split, the lr with the best
    validation accuracy (first on ties). The official code draws the inits from an unseeded global
    RNG; here from a forked RNG seeded with `seed`, in the same order, so a run is reproducible and
    the caller's RNG is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        best_acc, best_lr = 0.0, lrs[0]
        for lr in lrs:
            probe = _fit_torch_lr(train_f, train_y, num_classes, lr, iterations, device)
            acc = accuracy(probe.logits(val_f), val_y)
            if acc > best_acc:
                best_acc, best_lr = acc, lr
        return OfficialSelection(best_lr, torch.get_rng_state())


def refit_official_probe(train_f: torch.Tensor, train_y: torch.Tensor, selection: OfficialSelection,
                         num_classes: int, iterations: int = 1000, device: str = "cpu") -> NormalizedProbe:
    """heads.py:114: the chosen lr refitted on what the caller passes as train."""
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(selection.rng_state)
        return _fit_torch_lr(train_f, train_y, num_classes, selection.lr, iterations, device)


def fit_official_probe(train_f: torch.Tensor, train_y: torch.Tensor, val_f: torch.Tensor, val_y: torch.Tensor,
                       num_classes: int, iterations: int = 1000, lrs=OFFICIAL_LRS, seed: int = 0,
                       device: str = "cpu", refit_on_val: bool = True) -> NormalizedProbe:
    """The whole official probe: the lr search, then the refit on train + validation (refit_on_val)
    or on train alone."""
    selection = select_official_lr(train_f, train_y, val_f, val_y, num_classes, iterations, lrs, seed, device)
    if refit_on_val:
        train_f, train_y = torch.cat([train_f, val_f]), torch.cat([train_y, val_y])
    return refit_official_probe(train_f, train_y, selection, num_classes, iterations, device)


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
