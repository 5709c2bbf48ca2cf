"""Evaluation round after the pretrained model and after every task: zs, lp and head accuracies."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from tasks import TensorSplit
from tasks.compact import ImageStore, gather

from .. import progress
from ..distributed import gather_chunks, once, owned_chunks
from .multihead import MultiHeadClassifier
from .probe import (
    NormalizedProbe, OfficialSelection, accuracy, expected_calibration_error, fit_normalized_head, fit_probe,
    refit_official_probe, select_official_lr
)

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
    kept: dict[str, ProbeWork] = field(default_factory=dict)  # the datasets evaluate_round was asked to keep


@torch.no_grad()
def extract_features(encoder: torch.nn.Module, x: "torch.Tensor | ImageStore", batch_size: int = 256,
                     device: str = "cpu") -> torch.Tensor:
    """Pooled features in large no-grad batches, returned on the CPU as float32. Under DDP the
    batches are shared out among the ranks and gathered: each sample is encoded in the same batch
    as in one process, so every rank gets the one-process features."""
    was_training = encoder.training
    encoder.eval()
    count = -(-len(x) // batch_size)
    mine = {k: encoder(gather(x, slice(k * batch_size, (k + 1) * batch_size), device).to(device, non_blocking=True)
                       ).float().cpu() for k in owned_chunks(count)}
    out = gather_chunks(mine, count)
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


@dataclass
class ProbeWork:
    """What a round's linear probe of one dataset computed, kept for the next task's LP-init (which
    fits on the same features): probe-train (and the official probe's val) features, the official
    lr search and final probe."""

    train_f: torch.Tensor
    train_y: torch.Tensor
    val_f: Optional[torch.Tensor] = None
    val_y: Optional[torch.Tensor] = None
    selection: Optional[OfficialSelection] = None
    probe: Optional[NormalizedProbe] = None  # refitted on train + val when refit_on_val
    refit_on_val: bool = True  # the dataset's (EvalDataset.refit_on_val)


def probe_round(settings, work: ProbeWork, test_f: torch.Tensor, num_classes: int, seed: int,
                device: str, owner: int = 0) -> torch.Tensor:
    """Linear-probe logits on test features: settings.probe "sklearn" (C fixed, standardized
    features) or "official" (the LDIFS code's PyTorch probe, lr chosen on `work.val_f`, refitted on
    train and, with work.refit_on_val, val; the search and the probe are left in `work`). Under DDP
    rank `owner` alone fits and every rank receives the probe."""
    def fit() -> tuple:
        probe = _fit_round_probe(settings, work, num_classes, seed, device)
        return probe.to("cpu"), work.selection, work.probe and work.probe.to("cpu")

    probe, work.selection, kept = once(fit, owner)
    work.probe = kept and kept.to(device)
    return probe.to(device).logits(test_f)


def _fit_round_probe(settings, work: ProbeWork, num_classes: int, seed: int, device: str):
    if settings.probe != "official":
        return fit_probe(work.train_f, work.train_y, num_classes, C=settings.probe_C, seed=seed)
    if work.val_f is None:
        raise ValueError("the official probe needs a validation split")
    work.selection = select_official_lr(work.train_f, work.train_y, work.val_f, work.val_y, num_classes,
                                        settings.probe_iterations, seed=seed, device=device)
    fit = (torch.cat([work.train_f, work.val_f]), torch.cat([work.train_y, work.val_y])) if work.refit_on_val \
        else (work.train_f, work.train_y)
    work.probe = refit_official_probe(*fit, work.selection, num_classes, settings.probe_iterations, device)
    return work.probe


def lp_init_weights(settings, work: ProbeWork, num_classes: int, seed: int,
                    device: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    """LP-init head (weight, bias, how) from probe features of the encoder about to train. Official
    probe: refitted on the task's train split alone (finetune.py:38 passes `<dataset>Val`, whose
    train loader is the train split; heads.py:153-172, finetune_functions.py:89) -- from the round's
    lr search when `work` kept one, and the round's probe itself when that was fitted on train alone.
    Else logistic regression on normalized features, C chosen on val (fit_normalized_head)."""
    if settings.probe == "official":
        if work.probe is not None and not work.refit_on_val:
            probe = work.probe
        else:
            selection = work.selection or select_official_lr(work.train_f, work.train_y, work.val_f, work.val_y,
                                                             num_classes, settings.probe_iterations, seed=seed,
                                                             device=device)
            probe = refit_official_probe(work.train_f, work.train_y, selection, num_classes,
                                         settings.probe_iterations, device)
        return probe.weight.cpu(), probe.bias.cpu(), f"official probe, lr={probe.lr:g}"
    weight, bias, C = fit_normalized_head(work.train_f, work.train_y, work.val_f, work.val_y, num_classes, seed=seed)
    return weight, bias, f"C={C:g}"


def evaluate_round(model: MultiHeadClassifier, datasets: list[EvalDataset], trained: dict[str, int],
                   settings, device: str = "cpu", seed: int = 0,
                   zero_shot: Optional[dict[str, ZeroShotClassifier]] = None, desc: str = "eval",
                   kinds: Optional[Sequence[str]] = None, keep: Sequence[str] = ()) -> RoundResult:
    """trained maps task name -> task label of every task whose head exists (head accuracy).
    settings: an EvalConfig; zero_shot: fixed classifiers per dataset (zs_text: pretrained), else
    the current text tower builds them. kinds: only these of zs, lp, head (and their ECEs); None:
    all. Only what they need is computed: zs and head read test features alone, lp also the probe's.
    keep: datasets whose probe work is kept in `result.kept` (the next task's LP-init)."""
    result = RoundResult()
    want = set(kinds) if kinds is not None else {"lp", "zs", "head"}
    encoder, batch_size = model.encoder, settings.batch_size
    routed = getattr(encoder, "batch_router", None) is not None
    for i, ds in enumerate(progress.bar(datasets, desc=desc, leave=False, unit="dataset")):
        if routed:  # the text side of zs and head follows each test batch's route
            test_f, routed_logits = routed_test_pass(model, ds, trained.get(ds.name), batch_size, device,
                                                     zs="zs" in want and encoder.has_text and not zero_shot,
                                                     head="head" in want)
        else:
            test_f, routed_logits = extract_features(encoder, ds.test.x, batch_size, device), {}
        if "lp" in want:
            work = ProbeWork(extract_features(encoder, ds.probe_train.x, batch_size, device), ds.probe_train.y,
                             refit_on_val=ds.refit_on_val)
            if settings.probe == "official":
                work.val_f, work.val_y = extract_features(encoder, ds.probe_val.x, batch_size, device), ds.probe_val.y
            logits = probe_round(settings, work, test_f, ds.num_classes, seed, device, owner=i)
            if ds.name in keep:
                result.kept[ds.name] = work
            result.cells["lp"][ds.name] = accuracy(logits, ds.test.y)
            result.cells["lp_ece"][ds.name] = expected_calibration_error(logits, ds.test.y)
        if encoder.has_text and "zs" in want:
            if "zs" in routed_logits:
                zs = routed_logits["zs"]
            else:
                classifier = zero_shot[ds.name] if zero_shot else ZeroShotClassifier.build(encoder, ds, device)
                zs = classifier.logits(test_f)
            result.cells["zs"][ds.name] = accuracy(zs, ds.test.y)
            result.cells["zs_ece"][ds.name] = expected_calibration_error(zs, ds.test.y)
        if "head" in want:
            result.cells["head"][ds.name] = None
            if ds.name in trained:
                with torch.no_grad():
                    head_logits = routed_logits["head"] if "head" in routed_logits else \
                        model.head_logits(trained[ds.name], test_f.to(device)).cpu()
                result.cells["head"][ds.name] = accuracy(head_logits, ds.test.y)
    return result


@torch.no_grad()
def routed_test_pass(model: MultiHeadClassifier, ds: EvalDataset, task_label: Optional[int], batch_size: int,
                     device: str, zs: bool, head: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Test features of an encoder that routes each batch (`batch_router`: MoE-Adapters, DIKI), with the
    zero-shot and task-head logits of each batch computed under that batch's route (its text tower
    too): {"zs": ..., "head": ...} as asked. One process: these strategies do not train data-parallel."""
    encoder = model.encoder
    was_training = encoder.training
    encoder.eval()
    features, logits, classifiers = [], {"zs": [], "head": []}, {}
    if getattr(encoder, "route_templates", None):  # DIKI classifies with the first template alone
        ds = replace(ds, templates=list(ds.templates)[:encoder.route_templates])
    for start in range(0, len(ds.test.x), batch_size):
        f = encoder(gather(ds.test.x, slice(start, start + batch_size), device).to(device)).float()
        route = encoder.last_route
        features.append(f.cpu())
        if zs:
            if route not in classifiers:  # a route's class embeddings, built under it
                classifiers[route] = ZeroShotClassifier.build(encoder, ds, device)
            logits["zs"].append(classifiers[route].logits(f.cpu()))
        if head and task_label is not None:
            logits["head"].append(model.head_logits(task_label, f).cpu())
    encoder.train(was_training)
    empty = torch.empty(0, getattr(encoder, "feature_dim", 0))
    return torch.cat(features) if features else empty, {k: torch.cat(v) for k, v in logits.items() if v}
