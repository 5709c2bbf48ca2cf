"""`cfbench perf`: speed of the suite against bare PyTorch, measured in one process with the
variants alternated (machine drift cancels) and reported as median ratios."""
from __future__ import annotations

import copy
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import psutil
import torch

import tasks
from tasks.loading import load_split
from strategies.ldifs import LDIFSPlugin
from strategies.zscl import ZSCLPlugin
from tasks import TensorSplit
from tasks.base import FileSource
from tasks.cache import cached_images, decode
from tasks.offline import PHOTOS, _photo
from tasks.registry import select

from ..config import EvalConfig
from ..errors import CfbenchError
from ..evaluation.evaluate import EvalDataset, evaluate_round, extract_features
from ..evaluation.multihead import MultiHeadClassifier
from ..evaluation.probe import accuracy, fit_normalized_head, fit_official_probe, fit_probe
from ..models.factory import create_model
from ..models.clip import CLIPModel
from ..run.augment import RandomResizedCropBatch
from ..run.runner import _benchmark, _silent_evaluator, make_optimizer
from ..run.schedule import WarmupCosinePlugin
from ..run.training import FastNaive, configure_for_device


@dataclass
class Timing:
    name: str
    seconds: list[float]
    peak_mb: list[float]
    excluded: list[float] = field(default_factory=list)  # once-per-task setup inside `seconds`

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def median_without_setup(self) -> float:
        return statistics.median([s - e for s, e in zip(self.seconds, self.excluded or [0.0] * len(self.seconds))])


class PeakMemory:
    """Peak resident memory above the start (CPU, sampled) or peak CUDA allocation."""

    def __init__(self, device: str):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.proc = psutil.Process()
            self.base = self.proc.memory_info().rss
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.proc.memory_info().rss - self.base)

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self._stop.set()
            self.thread.join()
        self.mb = self.peak / 2**20


def alternate(variants: dict[str, Callable[[], Optional[float]]], repeats: int, device: str) -> dict[str, Timing]:
    """Run each variant once as warm-up, then `repeats` rounds of all variants in turn.
    A variant may return seconds of once-per-task setup it spent (reported apart)."""
    results = {name: Timing(name, [], []) for name in variants}
    for fn in variants.values():
        fn()
    for _ in range(repeats):
        for name, fn in variants.items():
            with PeakMemory(device) as mem:
                start = time.perf_counter()
                setup = fn()
                if device == "cuda":
                    torch.cuda.synchronize()
                results[name].seconds.append(time.perf_counter() - start)
                results[name].excluded.append(setup or 0.0)
            results[name].peak_mb.append(mem.mb)
    return results


def bare_epoch(model: MultiHeadClassifier, data: TensorSplit, batch_size: int, lr: float, device: str,
               epochs: int = 1, autocast: bool = False) -> Callable[[], None]:
    """The reference: a plain PyTorch loop over the same uint8 tensors, model and optimizer."""
    def run():
        optimizer = make_optimizer(model, "adamw", lr, 0.1)
        model.train()
        order = torch.cat([torch.randperm(len(data)) for _ in range(epochs)])
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            x, y = data.x[idx].to(device, non_blocking=True), data.y[idx].to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=autocast):
                loss = torch.nn.functional.cross_entropy(model(x, 0), y)
            loss.backward()
            optimizer.step()
    return run


def suite_epoch(model: MultiHeadClassifier, data: TensorSplit, batch_size: int, lr: float, device: str,
                plugins_factory: Callable[[], list], epochs: int = 1, augment=None, weight_decay: float = 0.1,
                label_smoothing: float = 0.0) -> Callable[[], None]:
    """One task through the suite's Avalanche strategy and plugins, as `cfbench run` trains."""

    bench = _benchmark([data])

    def run():
        strategy = FastNaive(model=model, optimizer=make_optimizer(model, "adamw", lr, weight_decay),
                             train_splits=[data], train_augment=augment,
                             criterion=torch.nn.CrossEntropyLoss(label_smoothing=label_smoothing),
                             train_mb_size=batch_size, train_epochs=epochs,
                             device=device, plugins=[*plugins_factory(), WarmupCosinePlugin(lr, 0)],
                             evaluator=_silent_evaluator())
        strategy.train(bench.train_stream[0], eval_streams=[])
    return run


def training_comparisons(encoder, data: TensorSplit, batch_size: int, repeats: int, device: str,
                         epochs: int = 3, ldifs_alpha: float = 10.0, augmented: bool = False) -> dict[str, Timing]:
    """One task of `epochs` epochs per variant (the LDIFS cache is built once per task).
    augmented: FT and LDIFS with RandomResizedCrop(0.9-1) batches (the `ldifs` protocol's training,
    where LDIFS's reference runs on every batch) instead of the cache comparison."""


    model = MultiHeadClassifier(encoder).to(device)
    model.ensure_head(0, int(data.y.max()) + 1)
    snapshot = copy.deepcopy(model.state_dict())

    def fresh(fn, plugins: Optional[list] = None):  # every variant starts from the same weights
        def run() -> float:
            model.load_state_dict(snapshot)
            if plugins is not None:
                plugins.clear()
            fn()
            return sum(getattr(p, "cache_seconds", 0.0) for p in plugins or [])
        return run

    made: dict[str, list] = {"cache": [], "no cache": []}

    def ldifs(cache: bool):
        key = "cache" if cache else "no cache"
        return lambda: made[key].append(LDIFSPlugin(ldifs_alpha, cache=cache)) or made[key][-1:]

    variants = {
        "bare FT task": fresh(bare_epoch(model, data, batch_size, 1e-5, device, epochs)),
        "suite FT task": fresh(suite_epoch(model, data, batch_size, 1e-5, device, lambda: [], epochs)),
    }
    if augmented:
        rrc = RandomResizedCropBatch((0.9, 1.0))
        variants["suite FT task (rrc)"] = fresh(suite_epoch(model, data, batch_size, 1e-5, device, lambda: [], epochs,
                                                            rrc))
        variants["suite LDIFS task (rrc)"] = fresh(suite_epoch(model, data, batch_size, 1e-5, device, ldifs(False),
                                                               epochs, rrc), made["no cache"])
    else:
        variants["suite LDIFS task (cache)"] = fresh(suite_epoch(model, data, batch_size, 1e-5, device, ldifs(True),
                                                                 epochs), made["cache"])
        variants["suite LDIFS task (no cache)"] = fresh(suite_epoch(model, data, batch_size, 1e-5, device,
                                                                    ldifs(False), epochs), made["no cache"])
    if device == "cuda":  # the ceiling: images already on the GPU, no loader at all
        resident = TensorSplit(data.x.to(device), data.y.to(device))
        variants["model-only FT task (GPU-resident)"] = fresh(bare_epoch(model, resident, batch_size, 1e-5, device,
                                                                         epochs))
    return alternate(variants, repeats, device)


def zscl_comparison(encoder, data: TensorSplit, batch_size: int, repeats: int, device: str,
                    epochs: int = 1) -> dict[str, Timing]:
    """ZSCL's training (the zscl-mtil protocol) against FT with the same text head: both train both
    towers as a text classifier (label smoothing 0.2); ZSCL adds a reference batch as large as the
    training batch (student forward + backward), the l2 term over every trained parameter and the
    weight average. The teacher's image features and text embeddings are cached by the plugin."""

    encoder.set_text_trainable(True)
    model = MultiHeadClassifier(encoder).to(device)
    prompts = [f"a photo of the number: \"{i}\"." for i in range(int(data.y.max()) + 1)]
    model.ensure_text_head(0, prompts)
    snapshot = copy.deepcopy(model.state_dict())

    def task(plugins: Callable[[], list]):
        train = suite_epoch(model, data, batch_size, 1e-5, device, plugins, epochs, weight_decay=0.0,
                            label_smoothing=0.2)

        def run():
            model.load_state_dict(snapshot)
            train()
        return run

    zscl = lambda: [ZSCLPlugin(data.x, prompts, text_loss=True, l2=1.0, avg_freq=100,  # noqa: E731
                               ref_batch_size=batch_size)]
    return alternate({"suite FT task (text head)": task(lambda: []), "suite ZSCL task (text head)": task(zscl)},
                     repeats, device)


def evaluation_comparison(encoder, names: list[str], image_size: int, repeats: int, device: str,
                          probe_cap: int = 100, test_cap: Optional[int] = None) -> dict[str, Timing]:
    """A full evaluation round from the preprocessed uint8 tensors vs decoding the sources again."""

    model = MultiHeadClassifier(encoder).to(device)

    def split(name: str, which: str, cap: Optional[int], from_cache: bool) -> TensorSplit:
        if from_cache:
            return load_split(name, which, image_size, max_per_class=cap)
        _, src, idx = select(name, which, max_per_class=cap)
        return TensorSplit(torch.from_numpy(decode(src, idx, image_size)), torch.from_numpy(src.labels[idx]))

    def sets(from_cache: bool) -> list[EvalDataset]:
        return [EvalDataset(n, tasks.task_classes(n), tasks.get_task(n).templates,
                            split(n, "train", probe_cap, from_cache), split(n, "test", test_cap, from_cache))
                for n in names]

    cached = sets(True)  # memory-mapped uint8, as every round of a run reads them

    def from_cache():
        evaluate_round(model, cached, {}, EvalConfig(), device, desc="eval")

    def decoding():  # sources stay loaded; every round resizes each image again (torchvision-style)
        evaluate_round(model, sets(False), {}, EvalConfig(), device, desc="eval")

    return alternate({"eval round from cache": from_cache, "eval round decoding": decoding}, repeats, device)


def probe_comparison(encoder, names: list[str], image_size: int, repeats: int, device: str,
                     probe_cap: int = 100, test_cap: Optional[int] = 300, iterations: int = 1000):
    """The linear probes on the same features: the demo's sklearn probe (C=1, standardized), the
    sklearn LP-init head (C swept on val) and the official PyTorch probe (5 lrs + refit, full-batch
    AdamW). Returns the timings and each one's test accuracy per dataset."""


    feats = {}
    for n in names:
        splits = [load_split(n, which, image_size, max_per_class=cap)
                  for which, cap in (("train", probe_cap), ("val", probe_cap), ("test", test_cap))]
        feats[n] = [(extract_features(encoder, s.x, 256, device), s.y) for s in splits]
    k = {n: tasks.get_task(n).num_classes for n in names}

    def sklearn_probe(n):
        (tf, ty), _, (xf, xy) = feats[n]
        return accuracy(fit_probe(tf, ty, k[n]).logits(xf), xy)

    def sklearn_head(n):
        (tf, ty), (vf, vy), (xf, xy) = feats[n]
        w, b, _ = fit_normalized_head(tf, ty, vf, vy, k[n])
        return accuracy(torch.nn.functional.normalize(xf, dim=-1) @ w.T + b, xy)

    def official(n):
        (tf, ty), (vf, vy), (xf, xy) = feats[n]
        return accuracy(fit_official_probe(tf, ty, vf, vy, k[n], iterations, device=device).logits(xf), xy)

    probes = {"sklearn probe (C=1)": sklearn_probe, "sklearn head (C sweep)": sklearn_head,
              "official probe": official}
    accuracies = {name: {n: fn(n) for n in names} for name, fn in probes.items()}
    timings = alternate({name: (lambda fn=fn: [fn(n) for n in names] and None) for name, fn in probes.items()},
                        repeats, device)
    return timings, accuracies


def photo_files(folder, copies: int = 20):
    """A file-backed source of real photographs: scikit-image's photos as JPEGs at their own size."""
    from PIL import Image


    paths, labels = [], []
    for label, name in enumerate(PHOTOS):
        img = Image.fromarray(_photo(name))
        for k in range(copies):
            path = folder / f"{name}_{k}.jpg"
            img.save(path, "JPEG", quality=80 + k % 15)
            paths.append(path)
            labels.append(label)
    return FileSource(paths, labels)


def data_path_comparison(names: list[str], image_size: int, repeats: int, photos) -> dict[str, Timing]:
    """Only the data path of an evaluation round: every split read from the cache vs decoded."""
    import numpy as np


    splits = [(name, *select(name, which)) for name in names for which in ("train", "test")]
    photo_idx = np.arange(len(photos))

    def read(from_cache: bool, jpeg: bool) -> None:
        for name, split, src, idx in ([("photos_jpeg", "test", photos, photo_idx)] if jpeg else splits):
            x = cached_images(name, split, src, idx, image_size) if from_cache else decode(src, idx, image_size)
            int(torch.as_tensor(x).max())  # touch every byte (max: no widened copy)

    read(True, False), read(True, True)  # build the caches once, outside the timings
    return alternate({"demo splits from cache": lambda: read(True, False),
                      "demo splits decoded": lambda: read(False, False),
                      "JPEG photos from cache": lambda: read(True, True),
                      "JPEG photos decoded": lambda: read(False, True)}, repeats, "cpu")


def report(title: str, timings: dict[str, Timing], baseline: str) -> list[str]:
    base = timings[baseline].median
    lines = [f"## {title}"]
    for name, t in timings.items():
        ratio = "" if name == baseline else f"  = {t.median / base:.2f} x {baseline}"
        lines.append(f"{name:<32} median {t.median:8.3f} s  peak +{statistics.median(t.peak_mb):7.0f} MB{ratio}")
    return lines


def run_perf(model_name: str, repeats: int, device: str, samples: int, batch_size: int, epochs: int = 3,
             evaluation: bool = True, augmented: bool = False, zscl: bool = False) -> str:
    """The comparisons of BENCHMARKS.md for one model; returns the printed report."""
    import platform



    if model_name == "efficientnet_lite0":
        encoder, size = create_model("efficientnet_lite0", "package", 64), 64
    else:  # random weights: only the cost matters here, never the accuracy
        import open_clip


        encoder = CLIPModel(open_clip.create_model(model_name, pretrained=None))
        size = encoder.image_size
    data = load_split("mnist5k", "train", size, max_per_class=max(1, samples // 10))
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name() if device == "cuda" else None
    lines = [f"# cfbench perf: {model_name} at {size} px, {len(data)} samples x {epochs} epochs, batch {batch_size}, "
             f"{repeats} repeats, device {device} ({gpu or cpu}), {torch.get_num_threads()} threads"]
    configure_for_device(encoder, device, "auto")
    if zscl:
        if not getattr(encoder, "has_text", False):
            raise CfbenchError("--zscl needs an open_clip model (a text tower)")
        timings = zscl_comparison(encoder.to(device), data, batch_size, repeats, device, epochs)
        lines += report(f"ZSCL vs FT, both with text heads ({epochs} epochs)", timings, "suite FT task (text head)")
        ratio = timings["suite ZSCL task (text head)"].median / timings["suite FT task (text head)"].median
        return "\n".join(lines + [f"ZSCL / FT (text heads) = {ratio:.2f}"])
    train = training_comparisons(encoder.to(device), data, batch_size, repeats, device, epochs, augmented=augmented)
    lines += report(f"training one task ({epochs} epochs)", train, "suite FT task")
    ft = train["suite FT task"]
    images = len(data) * epochs
    lines.append(f"suite FT / bare FT = {ft.median / train['bare FT task'].median:.2f}")
    if augmented:
        ft_rrc = train["suite FT task (rrc)"]
        lines.append(f"LDIFS (rrc) / FT (rrc) = {train['suite LDIFS task (rrc)'].median / ft_rrc.median:.2f}; "
                     f"FT (rrc) / FT = {ft_rrc.median / ft.median:.2f}")
    else:
        cached = train["suite LDIFS task (cache)"]
        lines.append(f"LDIFS (cache) / FT per task = {cached.median / ft.median:.2f}; per step, without the "
                     f"once-per-task reference pass ({statistics.median(cached.excluded):.2f} s) = "
                     f"{cached.median_without_setup / ft.median:.2f}")
        lines.append(f"LDIFS (no cache) / FT = {train['suite LDIFS task (no cache)'].median / ft.median:.2f}")
    lines.append("throughput: " + ", ".join(f"{name} {images / t.median:.1f} img/s" for name, t in train.items()))
    if "model-only FT task (GPU-resident)" in train:
        lines.append(f"end-to-end FT / model-only throughput = "
                     f"{train['model-only FT task (GPU-resident)'].median / ft.median:.2f}")
    if evaluation and model_name == "efficientnet_lite0":
        names = list(tasks.resolve_sequence("demo").tasks + tasks.resolve_sequence("demo").eval_only)
        ev = evaluation_comparison(encoder, names, size, repeats, device, test_cap=300)
        lines += report("evaluation round (" + ", ".join(names) + ")", ev, "eval round from cache")
        lines.append(f"decoding / cache = {ev['eval round decoding'].median / ev['eval round from cache'].median:.2f}")
        probes, acc = probe_comparison(encoder, names, size, repeats, device)
        lines += report("linear probes on the demo's features (" + ", ".join(names) + ")", probes,
                        "sklearn probe (C=1)")
        for name, per in acc.items():
            lines.append(f"{name:<24} test accuracy: " + ", ".join(f"{n} {a:.1f}" for n, a in per.items())
                         + f"; mean {statistics.mean(per.values()):.2f}")
        with tempfile.TemporaryDirectory() as folder:
            photos = photo_files(Path(folder))
            dp = data_path_comparison(names, size, repeats, photos)
        lines += report(f"data path only: every demo split, and {len(photos)} JPEG photos (native size) "
                        f"at {size} px", dp, "demo splits from cache")
        lines.append(f"demo splits: decoding / cache = {dp['demo splits decoded'].median / dp['demo splits from cache'].median:.1f}; "
                     f"JPEG photos: decoding / cache = {dp['JPEG photos decoded'].median / dp['JPEG photos from cache'].median:.1f}")
    return "\n".join(lines)
