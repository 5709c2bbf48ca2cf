"""Before / after of the waste removed in issue 24, measured in one process (BENCHMARKS.md):

- LDIFS's frozen reference: a deep copy of the whole CLIP vs its image tower alone;
- the next task's LP-init with the official probe: the whole probe again (lr search + refit) vs a
  refit from the evaluation round's kept lr search;
- ZSCL's teacher features of a reference set: float32 vs float16 storage, and what float16 does to
  the distillation loss.

    python -m benchmark.perf.fixes.waste [--model ViT-B-32] [--samples 2000] [--iterations 100] [--repeats 3]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from strategies.zscl import soft_cross_entropy

from ...evaluation.probe import fit_official_probe, refit_official_probe, select_official_lr
from ...models.factory import create_model

IMAGENET_TRAIN = 1_281_167


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def reference_copy(model_name: str, repeats: int) -> list[str]:
    encoder = create_model(model_name, None)  # random weights of the architecture: sizes and times only
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    whole, tower = copy.deepcopy(encoder), encoder.image_tower_copy()
    t_whole = _median_seconds(lambda: copy.deepcopy(encoder), repeats)
    t_tower = _median_seconds(encoder.image_tower_copy, repeats)
    return [f"| LDIFS reference ({model_name}) | whole CLIP: {count(whole) / 1e6:.1f} M parameters, "
            f"{count(whole) * 4 / 2**20:.0f} MB, copied in {t_whole:.2f} s | image tower: {count(tower) / 1e6:.1f} M, "
            f"{count(tower) * 4 / 2**20:.0f} MB, {t_tower:.2f} s | {count(tower) / count(whole):.2f} (memory) |"]


def lp_init(samples: int, width: int, classes: int, iterations: int, repeats: int) -> list[str]:
    g = torch.Generator().manual_seed(0)
    train_f, val_f = torch.randn(samples, width, generator=g), torch.randn(samples // 9, width, generator=g)
    train_y = torch.randint(0, classes, (samples,), generator=g)
    val_y = torch.randint(0, classes, (len(val_f),), generator=g)
    selection = select_official_lr(train_f, train_y, val_f, val_y, classes, iterations)
    before = _median_seconds(lambda: fit_official_probe(train_f, train_y, val_f, val_y, classes, iterations,
                                                        refit_on_val=False), repeats)
    after = _median_seconds(lambda: refit_official_probe(train_f, train_y, selection, classes, iterations), repeats)
    same = torch.equal(refit_official_probe(train_f, train_y, selection, classes, iterations).weight,
                       fit_official_probe(train_f, train_y, val_f, val_y, classes, iterations,
                                          refit_on_val=False).weight)
    return [f"| LP-init, official probe ({samples} x {width} features, {classes} classes, {iterations} steps) | "
            f"whole probe again: {before:.2f} s | refit from the round's lr search: {after:.2f} s (0 where the round "
            f"fitted on train alone) | {after / before:.2f} (time); heads identical: {same} |"]


def teacher_features(width: int, texts: int, batch: int) -> list[str]:
    g = torch.Generator().manual_seed(0)
    fp32_gb, fp16_gb = IMAGENET_TRAIN * width * 4 / 1e9, IMAGENET_TRAIN * width * 2 / 1e9
    teacher = F.normalize(torch.randn(batch, width, generator=g), dim=-1)
    student = F.normalize(teacher + 0.3 * torch.randn(batch, width, generator=g), dim=-1)
    text = F.normalize(torch.randn(texts, width, generator=g), dim=-1)

    def loss(t: torch.Tensor) -> float:
        return soft_cross_entropy(100 * student @ text.T, 100 * t @ text.T, 2.0).item()

    exact, half = loss(teacher), loss(teacher.half().float())
    return [f"| ZSCL teacher features (ImageNet train, {width}-d) | float32: {fp32_gb:.2f} GB | float16: "
            f"{fp16_gb:.2f} GB | {fp16_gb / fp32_gb:.2f} (memory); distillation loss on {batch} images x {texts} "
            f"texts: relative change {abs(half - exact) / exact:.1e} |"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--samples", type=int, default=2000, help="probe features (the same N before and after)")
    parser.add_argument("--iterations", type=int, default=100, help="full-batch steps per probe fit (official: 1000)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    rows = ["| waste | before | after | after / before |", "| --- | --- | --- | --- |"]
    rows += reference_copy(args.model, args.repeats)
    rows += lp_init(args.samples, 512, 100, args.iterations, args.repeats)
    rows += teacher_features(512, 1000, 64)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
