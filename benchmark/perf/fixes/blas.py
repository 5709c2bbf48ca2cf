"""The scikit-learn probes on one BLAS thread (now) vs on every core of the process (before), on the
demo's real features, alternated in one process (BENCHMARKS.md): the time the limit costs, and
whether the choice of C and the accuracy change with it.

    python -m benchmark.perf.fixes.blas [--image-size 64] [--cap 100] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import tasks
from tasks.loading import load_split

from ...config.schema import ModelConfig
from ...evaluation import probe
from ...evaluation.evaluate import extract_features
from ...evaluation.probe import accuracy, fit_normalized_head, fit_probe
from ...models.factory import build_model

NAMES = ("digits", "photo_patches", "faces")


def _features(image_size: int, cap: int) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    encoder = build_model(ModelConfig(image_size=image_size))
    return {n: [(extract_features(encoder, s.x), s.y) for s in
                 (load_split(n, which, image_size, max_per_class=c)
                  for which, c in (("train", cap), ("val", cap), ("test", None)))] for n in NAMES}


def _round(feats) -> tuple[dict[str, float], dict[str, float]]:
    """Per dataset: the LP-init head's chosen C and the evaluation probe's test accuracy."""
    cs, accs = {}, {}
    for n, ((tf, ty), (vf, vy), (xf, xy)) in feats.items():
        k = tasks.get_task(n).num_classes
        cs[n] = fit_normalized_head(tf, ty, vf, vy, k)[2]
        accs[n] = accuracy(fit_probe(tf, ty, k).logits(xf), xy)
    return cs, accs


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--cap", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    feats = _features(args.image_size, args.cap)
    variants = {"one BLAS thread (now)": 1, f"every core, {torch.get_num_threads()} threads (before)": None}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    found = {}
    for _ in range(args.repeats):
        for name, limit in variants.items():
            probe._ONE_BLAS_THREAD = limit
            start = time.perf_counter()
            found[name] = _round(feats)
            seconds[name].append(time.perf_counter() - start)
    probe._ONE_BLAS_THREAD = 1
    base = statistics.median(seconds[next(iter(variants))])
    print(f"| variant | median s ({args.repeats} alternated) | ratio | LP-init C per dataset | probe accuracy |")
    print("|---|---|---|---|---|")
    for name in variants:
        cs, accs = found[name]
        med = statistics.median(seconds[name])
        print(f"| {name} | {med:.2f} | {med / base:.2f} | {cs} | {({k: round(v, 1) for k, v in accs.items()})} |")


if __name__ == "__main__":
    main()
