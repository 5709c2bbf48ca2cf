"""A protocol's counted FLOPs and the hours they take at a GPU's datasheet peak: a floor under its GPU
hours, not a projection of them (a real run is slower: memory traffic, kernel launches, data loading,
the zero-shot text passes, the host's work).

torch's FlopCounterMode counts the matrix products and convolutions of cfbench's own training step per
strategy (forward, backward, the strategy's references), of its feature extraction, and of the official
probe's full-batch steps. Elementwise work is not counted. The projection's arithmetic then adds them
up: the rates here are items per FLOP, so its "seconds" are FLOPs.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop, sdpa_flop

import tasks
from tasks import TensorSplit

from ...config import RunConfig
from ...evaluation.evaluate import extract_features
from ...evaluation.probe import _fit_torch_lr
from ...models.base import FoundationModel
from .rates import Rates, train_rate

# dense peaks from NVIDIA's datasheets, TFLOP/s: fp32 on CUDA cores (torch's default for float32
# matrix products: no TF32), bf16 on tensor cores
DATASHEET_TFLOPS = {"H100 SXM": {"fp32": 67.0, "bf16": 989.0}, "A100 SXM": {"fp32": 19.5, "bf16": 312.0}}
# the CPU's fused attention, counted as the counter counts the GPU's (torch has no formula for it)
# (the registered formulas are wrapped to take shapes; FlopCounterMode wraps a custom one itself)
CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: sdpa_flop.__wrapped__,
                 torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: sdpa_backward_flop.__wrapped__}
COUNT_BATCH = 2  # training steps are counted at this batch and twice it (their FLOPs are linear in it)


def counted_flops(work: Callable[[], object]) -> int:
    """FLOPs of `work`'s matrix products and convolutions, on the CPU. nn.MultiheadAttention's inference
    fast path is one fused op the counter has no formula for: it is turned off while counting."""
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
            work()
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
    return counter.get_total_flops()


def flop_rates(cfg: RunConfig, encoder: FoundationModel, combos: list[str], classes: int,
               probe_classes: dict[str, int]) -> Rates:
    """Items per FLOP: a training image per strategy, an extracted image, and per dataset the official
    probe's full-batch step per feature (a scikit-learn probe runs on the host: 0 here)."""
    size = encoder.image_size

    def images(n: int) -> TensorSplit:
        return TensorSplit(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8), torch.arange(n) % classes)

    def per_training_image(combo: str) -> float:  # train_rate runs 2 steps (a warm-up and one timed)
        small, large = (counted_flops(lambda b=b: train_rate(cfg, encoder, combo, images(2 * b), classes, b, 1, "cpu"))
                        for b in (COUNT_BATCH, 2 * COUNT_BATCH))
        return (large - small) / (2 * COUNT_BATCH)

    train = {combo: 1 / per_training_image(combo) for combo in combos}
    extract = COUNT_BATCH / counted_flops(lambda: extract_features(encoder, images(COUNT_BATCH).x, COUNT_BATCH))
    width, probe = encoder.feature_dim, {}
    for name, k in probe_classes.items():
        if cfg.eval.probe == "official":
            x, y = torch.randn(64, width), torch.arange(64) % k
            steps = [counted_flops(lambda n=n: _fit_torch_lr(x, y, k, 0.1, n, "cpu")) for n in (1, 2)]
            probe[name] = (steps[1] - steps[0]) / len(x)
        else:
            probe[name] = 0.0
    return Rates(train=train, official_train={combo: None for combo in combos}, extract=extract,
                 official_extract=extract, probe=probe, official_probe=dict(probe))


def floor_hours(flops: float, precision: str) -> dict[str, float]:
    """Hours of `flops` at each listed GPU's datasheet peak for the precision."""
    return {gpu: flops / (peaks[precision] * 1e12) / 3600 for gpu, peaks in DATASHEET_TFLOPS.items()}


def probe_classes(names: tuple[str, ...]) -> dict[str, int]:
    return {name: tasks.get_task(name).num_classes for name in names}
