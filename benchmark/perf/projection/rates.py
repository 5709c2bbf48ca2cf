"""The rates `cfbench perf --projection` projects from, measured on this device in one process:
images/s of cfbench's training step per strategy (the suite's FastNaive, plugins, augmentation
and precision on uint8 batches, as `cfbench run` trains), of its feature extraction, the probe's
cost per dataset, and the same for the official code's path (official.py).

On a GPU the training step runs at the protocol's batch size and the probes at the datasets' real
feature counts where they fit; on a CPU everything runs at --samples images / features and the
projection scales by count."""
from __future__ import annotations

import copy
import math
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from avalanche.core import SupervisedPlugin

import strategies
import tasks
from tasks import TensorSplit
from tasks.base import FileSource
from tasks.cache import cached_images

from ...config import RunConfig
from ...config.plan import RunPlan
from ...evaluation.evaluate import extract_features
from ...evaluation.multihead import MultiHeadClassifier
from ...evaluation.probe import OFFICIAL_LRS, fit_official_probe, fit_probe
from ...models.base import FoundationModel
from ...models.factory import create_model
from ...models.clip import wants_quick_gelu
from ...run.augment import build_augment
from ...run.runner import _benchmark, _silent_evaluator, make_optimizer
from ...run.schedule import GradClipPlugin, WarmupCosinePlugin
from ...run.training import FastNaive, configure_for_device
from . import official

CPU_TRAIN_STEPS = 2         # timed training steps after one warm-up step, on a CPU
CPU_EXTRACT_BATCHES = 2     # timed extraction batches at least, on a CPU
GPU_TRAIN_STEPS = 8         # at least, on a GPU
GPU_EXTRACT_BATCHES = 4     # timed extraction batches at least, on a GPU
PROBE_STEPS = 20            # timed full-batch steps per probe fit
PROBE_GPU_BYTES = 32 * 2 ** 30  # features, logits and their gradients of one GPU probe fit at most
PROBE_FITS = len(OFFICIAL_LRS) + 1  # fits of one official-probe evaluation: one per lr, then the refit


@dataclass(frozen=True)
class Rates:
    """What the device does. Probe costs are seconds per feature and full-batch step (official
    probe) or per feature and fit (sklearn), measured per dataset (its width and classes)."""

    train: dict[str, float]                     # strategy -> images/s of cfbench's training step
    official_train: dict[str, Optional[float]]  # strategy -> images/s; None: no official step emulated
    extract: float                              # images/s of cfbench's feature extraction
    official_extract: float                     # images/s: JPEG files through a DataLoader, fp32
    probe: dict[str, float]
    official_probe: dict[str, float]


def random_encoder(cfg: RunConfig) -> FoundationModel:
    """The protocol's architecture with random weights (nothing is read or downloaded): only the
    cost matters here. QuickGELU as the protocol's pretrained tag would build it."""
    quick = None if cfg.model.name == "efficientnet_lite0" else \
        wants_quick_gelu(cfg.model.name, cfg.model.pretrained, cfg.model.quick_gelu)
    return create_model(cfg.model.name, None, cfg.model.image_size, cfg.model.freeze_bn, quick)


def say(message: str) -> None:
    print(f"perf --projection: {message}", file=sys.stderr, flush=True)


class StepTimer(SupervisedPlugin):
    """Marks the end of every training step: the steps after the first are timed, without the
    once-per-task setup (LDIFS's reference copy) or after-task passes (EWC's Fisher)."""

    def __init__(self, device: str):
        super().__init__()
        self.device, self.marks, self.images = device, [], []

    def after_training_iteration(self, strategy, **kwargs):
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.marks.append(time.perf_counter())
        self.images.append(len(strategy.mb_x))

    def rate(self) -> float:
        return sum(self.images[1:]) / (self.marks[-1] - self.marks[0])


def _prompts(classes: int) -> list[str]:
    return [f"a photo of a thing number {i}." for i in range(classes)]


def train_rate(cfg: RunConfig, encoder: FoundationModel, combo: str, data: TensorSplit, classes: int, batch: int,
               steps: int, device: str) -> float:
    """Images/s of `steps` training steps (after one warm-up step) of one task, as the runner's
    learner trains: the strategy's plugins, schedule, clipping, augmentation and precision."""
    enc = copy.deepcopy(encoder)
    head = strategies.train_head(combo, cfg.train.head)
    if enc.has_text:
        enc.set_text_trainable(head == "text")
    configure_for_device(enc, device, cfg.train.precision)
    model = MultiHeadClassifier(enc).to(device)
    if head == "text":
        model.ensure_text_head(0, _prompts(classes))
    else:
        model.ensure_head(0, classes)
    ctx = strategies.BuildContext(image_size=enc.image_size, seed=cfg.seed, tasks=("perf",),
                                  train_split=cfg.train.split, template_of=lambda n: "a photo of a {}.",
                                  templates_of=lambda n: ["a photo of a {}."],
                                  classes_of=lambda n: [f"thing {i}" for i in range(classes)],
                                  tokenizer=getattr(enc, "tokenizer", None))
    plugins = strategies.build_plugins(combo, strategies.resolve_params(combo, cfg.strategy_params), ctx)
    t, timer = cfg.train, StepTimer(device)
    controls = [WarmupCosinePlugin(1e-5, t.warmup_steps, t.schedule_steps)]  # the lr's value costs nothing
    controls += [GradClipPlugin(t.grad_clip)] if t.grad_clip else []
    learner = FastNaive(model=model, optimizer=make_optimizer(model, t.optimizer, 1e-5, t.weight_decay),
                        criterion=torch.nn.CrossEntropyLoss(label_smoothing=t.label_smoothing), train_splits=[data],
                        train_steps=1 + steps, train_augment=build_augment(t.augment), train_mb_size=batch,
                        train_epochs=1, device=device, plugins=[*plugins, *controls, timer],
                        evaluator=_silent_evaluator())
    learner.train(_benchmark([data]).train_stream[0], eval_streams=[])
    return timer.rate()


def extract_rate(encoder: FoundationModel, data: TensorSplit, batch: int, device: str) -> float:
    """Images/s of `extract_features` over the whole split (no grad, the evaluation's batch size,
    decoding as the run's cache does) after one warm-up batch."""
    extract_features(encoder, data.x[:batch], batch, device)
    _sync(device)
    start = time.perf_counter()
    extract_features(encoder, data.x, batch, device)
    return len(data) / (time.perf_counter() - start)


def probe_size(n: int, width: int, classes: int, samples: int, device: str) -> int:
    """Features a probe fit is measured at: --samples on a CPU (scaled by count), the real count on
    a GPU while features, logits and their gradients fit PROBE_GPU_BYTES."""
    if device != "cuda":
        return min(n, samples)
    return max(1, min(n, PROBE_GPU_BYTES // (4 * (width + 3 * classes))))


def probe_seconds(cfg: RunConfig, features: torch.Tensor, classes: int, device: str) -> float:
    """cfbench's probe: seconds per feature and full-batch step of fit_official_probe (the time of
    PROBE_STEPS more iterations in each of its PROBE_FITS fits: the per-fit setup, which 1000
    iterations amortize, is left out), or per feature of one sklearn fit."""
    labels = torch.arange(len(features)) % classes
    val = features[: max(1, len(features) // 10)]

    def seconds(iterations: int) -> float:
        _sync(device)
        start = time.perf_counter()
        if cfg.eval.probe == "official":
            fit_official_probe(features, labels, val, labels[: len(val)], classes, iterations, device=device,
                               refit_on_val=False)
        else:
            fit_probe(features.cpu(), labels, classes, C=cfg.eval.probe_C, seed=cfg.seed)
        _sync(device)
        return time.perf_counter() - start

    if cfg.eval.probe != "official":
        return seconds(0) / len(features)
    short, long = seconds(1), seconds(1 + PROBE_STEPS)
    steps = long - short if long > short else long  # noise on tiny fits: then the setup stays in
    return steps / (PROBE_FITS * PROBE_STEPS * len(features))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _measured(what: str, measure):
    say(f"{what} ...")
    start = time.perf_counter()
    value = measure()
    shown = "not emulated" if value is None else f"{value:.1f} img/s"
    say(f"{what}: {shown} ({time.perf_counter() - start:.0f} s)")
    return value


def describe_device(device: str) -> str:
    if device == "cuda":
        return f"GPU ({torch.cuda.get_device_name()})"
    threads = torch.get_num_threads()
    return f"CPU ({platform.processor() or platform.machine()}, {threads} thread{'s' if threads != 1 else ''})"


def measure_rates(cfg: RunConfig, plan: RunPlan, encoder: FoundationModel, combos: list[str], samples: int,
                  device: str, probe_counts: dict[str, int], cache_format: str = "raw") -> Rates:
    """Every rate the projection of `combos` over `plan` needs, on `device`, from `samples` photos
    (at least a batch) cached as the run would cache them at full scale (`cache_format`: compact
    stores decode every batch); probe_counts: each evaluated dataset's probe training features
    (the size a GPU measures at); encoder: the protocol's architecture (random_encoder)."""
    scaled = device != "cuda"
    classes = tasks.get_task(plan.trained[0]).num_classes
    batch = min(cfg.train.batch_size, samples) if scaled else cfg.train.batch_size
    steps = CPU_TRAIN_STEPS if scaled else max(GPU_TRAIN_STEPS, math.ceil(samples / batch))
    eval_batch = min(cfg.eval.batch_size, samples) if scaled else cfg.eval.batch_size
    eval_batches = max(CPU_EXTRACT_BATCHES if scaled else GPU_EXTRACT_BATCHES, math.ceil(samples / eval_batch))
    train, official_train = {}, {}
    with tempfile.TemporaryDirectory(prefix="cfbench-perf-") as folder:
        n = max(samples, batch, eval_batch * eval_batches)
        paths = official.write_photos(Path(folder), n)
        images = cached_images("perf", "photos", FileSource(paths, [0] * n), np.arange(n), encoder.image_size,
                               str(Path(folder) / "cache"), cache_format)
        data = TensorSplit(images, torch.arange(n) % classes)
        for combo in combos:
            train[combo] = _measured(f"cfbench training step ({cache_format} cache), {combo}, batch {batch}, "
                                     f"1 + {steps} steps",
                                     lambda: train_rate(cfg, encoder, combo, data, classes, batch, steps, device))
            official_train[combo] = _measured(
                f"official training step, {combo}, batch {batch}, 1 + {steps} steps",
                lambda: _official_train(cfg, encoder, combo, paths, classes, batch, steps, device))
        evaluator = copy.deepcopy(encoder)
        configure_for_device(evaluator, device, cfg.train.precision)
        extract = _measured(f"cfbench feature extraction ({cache_format} cache), batch {eval_batch}, {n} images",
                            lambda: extract_rate(evaluator.to(device), data, eval_batch, device))
        official_extract = _measured(f"official feature extraction, batch {eval_batch}, 1 + {eval_batches} batches",
                                     lambda: official.extract_rate(encoder, paths, eval_batch, eval_batches, device))
    probe, official_probe = _probes(cfg, probe_counts, encoder.feature_dim, samples, device)
    return Rates(train, official_train, extract, official_extract, probe, official_probe)


def _official_train(cfg: RunConfig, encoder: FoundationModel, combo: str, paths, classes: int, batch: int, steps: int,
                    device: str) -> Optional[float]:
    if strategies.train_head(combo, cfg.train.head) != "linear":
        return None  # a text-head step (ZSCL's protocol) is not emulated
    t = cfg.train
    parts = [spec.name for spec in strategies.parse_strategy(combo)]
    return official.train_rate(encoder, parts, strategies.resolve_params(combo, cfg.strategy_params), paths, classes,
                               batch, steps, device, 1e-5, t.weight_decay, t.grad_clip, t.label_smoothing, t.augment)


def _probes(cfg: RunConfig, counts: dict[str, int], width: int, samples: int, device: str):
    """Per dataset: cfbench's probe cost and the official probe's, on random features of the
    dataset's width and classes (the steps of a full-batch fit cost the same whatever the values)."""
    probe, official_probe = {}, {}
    for i, (name, count) in enumerate(counts.items()):
        classes = tasks.get_task(name).num_classes
        m = probe_size(count, width, classes, samples, device)
        features = torch.randn(m, width, generator=torch.Generator().manual_seed(i)).to(device)
        if i == 0:  # warm-up: first calls pay for kernel selection and allocation
            probe_seconds(cfg, features[: min(m, 8)], classes, device)
        start = time.perf_counter()
        probe[name] = probe_seconds(cfg, features, classes, device)
        if cfg.eval.probe == "official":
            official_probe[name] = official.probe_seconds(features, classes, PROBE_STEPS, device)
        say(f"probe {name}: {m} x {width} features, {classes} classes ({time.perf_counter() - start:.1f} s)")
    return probe, official_probe
