"""The official LDIFS code's path (omegafragger/ldifs_code, c7e82a4), emulated on this device for
`cfbench perf --projection`: JPEG files decoded by PIL in DataLoader worker processes with
per-image torchvision transforms, fp32 throughout, a plain forward / backward / AdamW step with
the LDIFS reference forward every step, and its PyTorch probe. Each measurement returns a rate and
cites the official code it stands for."""
from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from tasks.offline import PHOTOS, _photo

from ...evaluation.probe import OFFICIAL_LRS
from ...models.base import FoundationModel

# num_workers of every official loader (datasets/*.py, datasets/registry.py:get_dataset), capped at the cores here
OFFICIAL_WORKERS = 16
PHOTO_SIZE = (500, 375)  # ImageNet's typical photo (w, h): ImageNet is 1.28 M of ldifs10's 1.74 M images
# strategies whose official training step is emulated (finetune_functions.py: ce, ls, l2sp, ldifs)
OFFICIAL_STEPS = ("ft", "lpft", "ls", "l2sp", "ldifs")


def write_photos(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` JPEG files of real photographs (scikit-image's), random PHOTO_SIZE crops, quality 90."""
    rng = np.random.default_rng(seed)
    w, h = PHOTO_SIZE
    paths = []
    for i in range(count):
        img = Image.fromarray(_photo(PHOTOS[i % len(PHOTOS)]))
        scale = max(w / img.width, h / img.height, 1.0)
        if scale > 1:
            img = img.resize((round(img.width * scale + 0.5), round(img.height * scale + 0.5)), Image.BICUBIC)
        left, top = rng.integers(0, img.width - w + 1), rng.integers(0, img.height - h + 1)
        paths.append(folder / f"photo_{i:05d}.jpg")
        img.crop((left, top, left + w, top + h)).save(paths[-1], "JPEG", quality=90)
    return paths


class JpegFiles(Dataset):
    """`length` samples cycling over the files, opened and transformed one by one as the official
    datasets' __getitem__ does (Image.open(path).convert("RGB"), then the transform)."""

    def __init__(self, paths: Sequence[Path], classes: int, transform, length: int):
        self.paths, self.classes, self.transform, self.length = [str(p) for p in paths], classes, transform, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        with Image.open(self.paths[i % len(self.paths)]) as img:
            return self.transform(img.convert("RGB")), i % self.classes


def transform(encoder: FoundationModel, train: bool, scale=(0.9, 1.0), ratio=(0.75, 4 / 3)):
    """open_clip's train / val preprocess as the official model carries it (model.train_preprocess,
    model.val_preprocess): RandomResizedCrop or Resize + CenterCrop, bicubic; ToTensor; Normalize."""
    size, bicubic = encoder.image_size, T.InterpolationMode.BICUBIC
    geometry = ([T.RandomResizedCrop(size, scale=tuple(scale), ratio=tuple(ratio), interpolation=bicubic)] if train
                else [T.Resize(size, interpolation=bicubic), T.CenterCrop(size)])
    mean, std = encoder.mean.flatten().tolist(), encoder.std.flatten().tolist()
    return T.Compose([*geometry, T.ToTensor(), T.Normalize(mean, std)])


def workers() -> int:
    return min(OFFICIAL_WORKERS, os.cpu_count() or 1)


def _loader(dataset: Dataset, batch: int, shuffle: bool) -> DataLoader:
    return DataLoader(dataset, batch_size=batch, shuffle=shuffle, num_workers=workers())


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed_images(batches, step, device: str) -> float:
    """Images/s of `step` over the batches after the first (warm-up), data waiting included."""
    start, images = None, 0
    for i, (x, y) in enumerate(batches):
        step(x.to(device), y.to(device))
        _sync(device)
        if i == 0:
            start = time.perf_counter()
        else:
            images += len(x)
    return images / (time.perf_counter() - start)


class _Slices:
    """Outputs of the encoder's LDIFS slice modules during a forward (the official get_features:
    ln_pre and the residual stream after blocks 3, 6, 9, 12, model/modeling.py:95-131)."""

    def __init__(self, encoder: FoundationModel):
        self.outputs: list[torch.Tensor] = []
        self.handles = [m.register_forward_hook(self._keep) for m in encoder.slice_modules()]

    def _keep(self, _module, _inputs, output):
        self.outputs.append(output[0] if isinstance(output, tuple) else output)

    def take(self) -> list[torch.Tensor]:
        out, self.outputs = self.outputs, []
        return out


def _ldifs(current: list[torch.Tensor], reference: list[torch.Tensor]) -> torch.Tensor:
    """loss/ldifs.py:11-42: normalize along dim 1, squared difference, means."""
    def unit(x):
        return x / (torch.sqrt(torch.sum(x ** 2, dim=1, keepdim=True)) + 1e-10)
    diffs = [((unit(a) - unit(r)) ** 2).flatten(1).mean(dim=-1) for a, r in zip(current, reference)]
    return torch.stack(diffs, dim=1).mean(dim=-1).mean(dim=0)


def train_rate(encoder: FoundationModel, parts: Sequence[str], params: dict, paths: Sequence[Path], classes: int,
               batch: int, steps: int, device: str, lr: float, weight_decay: float, grad_clip: Optional[float],
               label_smoothing: float, augment) -> Optional[float]:
    """Images/s of the official training loop (finetune_functions.py:finetune_ft / finetune_ldifs);
    None where a component of the strategy has no emulated official step."""
    if any(p not in OFFICIAL_STEPS for p in parts):
        return None
    enc = copy.deepcopy(encoder).to(device)
    enc.autocast_dtype = None  # fp32: the official code has no autocast
    if enc.has_text:
        enc.set_text_trainable(False)  # modeling.py:88-89 deletes the text transformer
    enc.train()
    head = nn.Linear(enc.feature_dim, classes).to(device)
    trained = [p for p in enc.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=weight_decay)  # not fused, as the official
    reference = copy.deepcopy(enc).eval().requires_grad_(False) if {"ldifs", "l2sp"} & set(parts) else None
    slices = (_Slices(enc), _Slices(reference)) if "ldifs" in parts else None

    def step(x, y):
        optimizer.zero_grad()
        logits = head(F.normalize(enc.encode_image(x), dim=-1))  # ImageClassifier: encoder, normalized head
        loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        if slices is not None:  # CE_LDIFS: the reference's and a second trained forward's slices, every step
            slices[0].take()
            reference.encode_image(x)
            enc.encode_image(x)
            loss = loss + params["ldifs"]["alpha"] * _ldifs(slices[0].take(), slices[1].take())
        if "l2sp" in parts:  # loss/l2_sp.py: squared distance of the encoder's weights to the reference's
            trainable = [p for p in enc.parameters() if p.requires_grad]
            frozen = [q for p, q in zip(enc.parameters(), reference.parameters()) if p.requires_grad]
            loss = loss + params["l2sp"]["alpha"] * sum(((p - q) ** 2).sum() for p, q in zip(trainable, frozen))
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(trained, grad_clip)
        optimizer.step()

    train_tf = transform(enc, True, augment.scale, augment.ratio)
    return _timed_images(_loader(JpegFiles(paths, classes, train_tf, (1 + steps) * batch), batch, True), step, device)


@torch.no_grad()
def extract_rate(encoder: FoundationModel, paths: Sequence[Path], batch: int, batches: int, device: str) -> float:
    """Images/s of the official feature extraction (heads.py:get_embeddings, metrics' get_logits_labels):
    val_preprocess in the workers, fp32 forward."""
    enc = copy.deepcopy(encoder).to(device).eval()
    enc.autocast_dtype = None
    data = JpegFiles(paths, 1, transform(enc, False), (1 + batches) * batch)
    return _timed_images(_loader(data, batch, False), lambda x, y: enc.encode_image(x), device)


def _fit(x: torch.Tensor, y: torch.Tensor, classes: int, lr: float, iterations: int) -> nn.Linear:
    """model/logistic_regression.py:10-36: AdamW on a ClassificationHead that normalizes its input
    every step, full batch, fp32."""
    head = nn.Linear(x.shape[1], classes).to(x.device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr)
    with torch.enable_grad():
        for _ in range(iterations):
            optimizer.zero_grad()
            F.cross_entropy(head(x / x.norm(dim=-1, keepdim=True)), y).backward()
            optimizer.step()
    return head


@torch.no_grad()
def _probe(x: torch.Tensor, y: torch.Tensor, val: torch.Tensor, val_y: torch.Tensor, classes: int,
           iterations: int) -> None:
    """model/heads.py:linear_probe_pytorch: one fit per lr, the best on validation refitted."""
    best, best_lr = 0.0, OFFICIAL_LRS[0]
    for lr in OFFICIAL_LRS:
        head = _fit(x, y, classes, lr, iterations)
        accuracy = (head(val / val.norm(dim=-1, keepdim=True)).argmax(dim=-1) == val_y).float().mean().item()
        if accuracy > best:
            best, best_lr = accuracy, lr
    _fit(x, y, classes, best_lr, iterations)


def probe_seconds(features: torch.Tensor, classes: int, steps: int, device: str) -> float:
    """Seconds per feature and full-batch step of the official probe: the time of `steps` more
    iterations in each of its fits (per-fit setup, amortized by 1000 iterations, left out)."""
    x = features.to(device, torch.float32)
    y = (torch.arange(len(x)) % classes).to(device)
    val, val_y = x[: max(1, len(x) // 10)], y[: max(1, len(x) // 10)]

    def seconds(iterations: int) -> float:
        _sync(device)
        start = time.perf_counter()
        _probe(x, y, val, val_y, classes, iterations)
        _sync(device)
        return time.perf_counter() - start

    short, long = seconds(1), seconds(1 + steps)
    return (long - short if long > short else long) / ((len(OFFICIAL_LRS) + 1) * steps * len(x))
