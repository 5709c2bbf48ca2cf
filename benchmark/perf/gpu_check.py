"""`make gpu-check`: everything GPU-specific in one call, each part timed (BENCHMARKS.md).

    python -m benchmark.perf.gpu_check [--out DIR] [--device cuda] [--tiny]

1. training: cfbench's training step (FastNaive, the strategy's plugins, schedule, clipping and the
   protocol's precision) for FT and LDIFS (`ldifs` protocol) and ZSCL (`zscl-mtil` protocol), on the
   protocols' ViT-B-32 architecture (random weights) at 224 px, batch 128: images/s and peak memory;
2. compact reads: random batches of the compact (JPEG) cache decoded on the device (nvJPEG on CUDA);
3. the official probe at ImageNet's real size: full-batch AdamW steps on 1,261,167 x 512 features
   and 1,000 classes, and the 6,000 steps of its lr search and refit projected from them;
4. a process group of one rank (NCCL on CUDA): a DistributedDataParallel step and the object
   collectives cfbench's ranks use (`once`, `share_out`);
5. `cfbench perf --projection ldifs` (FT and LDIFS) at its default sample count, with the ratio to the
   emulated official path.

Writes gpu-check.json and gpu-check.md into --out. A part that fails is recorded with its error and
the exit status is 1. `--tiny` runs every part at toy sizes on any device (a random tiny CLIP, a
thousand features): the test suite runs it on the CPU so that the GPU path cannot rot.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import open_clip
import torch
import torch.distributed as dist

from tasks.base import TensorSplit
from tasks.cache import cached_images
from tasks.compact import gather

from .. import distributed
from ..config import load_config
from ..evaluation.probe import _fit_torch_lr
from ..files import atomic_write_json, atomic_write_text
from .cache import load_photos, photo_files
from .projection import run_projection
from .projection.memory import peak_bytes
from .projection.rates import describe_device, random_encoder, train_rate

IMAGENET_TRAIN, FEATURES, CLASSES = 1_281_167 - 20_000, 512, 1000  # ImageNet train less cfbench's val hold-out
OFFICIAL_PROBE_STEPS = 6 * 1000  # five lrs of the search and the refit, 1,000 full-batch steps each
TINY_NAME = "cfbench-gpu-check-tiny"
TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _config(protocol: str, tiny: bool, **train):
    """The protocol's settings, its ZSCL reference task replaced by the offline photo_patches (only
    the cost is measured); tiny: the random tiny CLIP at 32 px."""
    cfg = load_config(None, {"protocol": protocol})
    cfg = cfg.replace(strategy_params={**cfg.strategy_params,
                                       "zscl": {**cfg.strategy_params.get("zscl", {}), "reference_task": "photo_patches"}},
                      train=replace(cfg.train, **train))
    if tiny:
        cfg = cfg.replace(model=replace(cfg.model, name=TINY_NAME, image_size=32, pretrained=None))
    return cfg


def training(tiny: bool, device: str) -> dict:
    batch, steps = (4, 2) if tiny else (128, 10)
    out = {}
    for protocol, combo in (("ldifs", "ft"), ("ldifs", "ldifs"), ("zscl-mtil", "zscl")):
        cfg = _config(protocol, tiny)
        encoder = random_encoder(cfg)
        g = torch.Generator().manual_seed(0)
        size = encoder.image_size
        data = TensorSplit(torch.randint(0, 256, (batch * (steps + 1), 3, size, size), dtype=torch.uint8, generator=g),
                           torch.arange(batch * (steps + 1)) % 10)
        rate: list[float] = []
        peak = peak_bytes(lambda: rate.append(train_rate(cfg, encoder, combo, data, 10, batch, steps, device)), device)
        out[f"{protocol}/{combo}"] = {"model": cfg.model.name, "image_size": size, "batch": batch,
                                      "precision": cfg.train.precision, "images_per_s": round(rate[0], 1),
                                      "peak_gib": round(peak / 2 ** 30, 4)}
    return out


def compact_reads(tiny: bool, device: str) -> dict:
    images, batch, batches = (28, 8, 2) if tiny else (4096, 256, 16)
    with tempfile.TemporaryDirectory() as tmp:
        photos = load_photos()
        files = photo_files(Path(tmp) / "photos", photos, max(1, images // len(photos)))
        store = cached_images("photos", "train", files, np.arange(len(files)), 64 if tiny else 224, tmp, "compact")
        gather(store, torch.arange(batch), device)  # warm-up (the decoder's first call)
        _sync(device)
        start = time.perf_counter()
        for _ in range(batches):
            gather(store, torch.randint(len(store), (batch,)), device).float().mean()
        _sync(device)
        return {"images": len(store), "batch": batch, "images_per_s": round(batch * batches /
                                                                          (time.perf_counter() - start), 1)}


def official_probe(tiny: bool, device: str) -> dict:
    n, width, classes, steps = (2000, 16, 10, 3) if tiny else (IMAGENET_TRAIN, FEATURES, CLASSES, 10)
    g = torch.Generator().manual_seed(0)
    features = torch.randn(n, width, generator=g)
    labels = torch.randint(classes, (n,), generator=g)
    _fit_torch_lr(features[:1000], labels[:1000], classes, 0.1, 1, device)  # warm-up
    _sync(device)
    start = time.perf_counter()
    peak = peak_bytes(lambda: _fit_torch_lr(features, labels, classes, 0.1, steps, device), device)
    per_step = (time.perf_counter() - start) / steps
    return {"features": n, "width": width, "classes": classes, "seconds_per_step": round(per_step, 4),
            "projected_probe_s": round(per_step * OFFICIAL_PROBE_STEPS, 1), "peak_gib": round(peak / 2 ** 30, 4)}


def one_rank_group(tiny: bool, device: str) -> dict:
    backend = "nccl" if device == "cuda" else "gloo"
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group(backend, init_method=f"file://{tmp}/rendezvous", rank=0, world_size=1)
        try:
            start = time.perf_counter()
            model = torch.nn.Linear(64, 10).to(device)
            ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[0] if device == "cuda" else None)
            ddp(torch.randn(32, 64, device=device)).square().mean().backward()
            box = [torch.arange(4)]
            dist.broadcast_object_list(box, src=0)
            gathered: list = [None]
            dist.all_gather_object(gathered, {"rank": 0})
            kept: list = []
            distributed.share_out(3, lambda k: torch.full((2,), k), lambda k, v: kept.append(int(v[0])))
            _sync(device)
            assert kept == [0, 1, 2] and gathered == [{"rank": 0}] and torch.equal(box[0], torch.arange(4))
            return {"backend": backend, "seconds": round(time.perf_counter() - start, 3)}
        finally:
            dist.destroy_process_group()


def projection(tiny: bool, device: str) -> dict:
    tiny_model = {"name": TINY_NAME, "image_size": 32, "pretrained": None}
    result, _ = run_projection("ldifs", ["ft", "ldifs"], 4 if tiny else 256, device, tiny_model if tiny else None)
    return result


PARTS: dict[str, Callable[[bool, str], dict]] = {
    "training": training, "compact_reads": compact_reads, "official_probe": official_probe,
    "one_rank_group": one_rank_group, "projection": projection}


def _markdown(report: dict) -> str:
    lines = [f"# cfbench gpu-check{' (--tiny)' if report['tiny'] else ''}: {report['device']}", ""]
    for name, part in report["parts"].items():
        status = "ok" if "error" not in part else f"FAILED: {part['error']}"
        lines.append(f"## {name} ({part['seconds']:.1f} s, {status})")
        lines += [f"- {k}: {json.dumps(v)}" for k, v in part.get("result", {}).items()
                  if k not in ("projections", "rates")]
        lines.append("")
    return "\n".join(lines)


def _register_tiny() -> None:
    folder = Path(tempfile.mkdtemp(prefix="cfbench-gpu-check-"))
    (folder / f"{TINY_NAME}.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(folder / f"{TINY_NAME}.json")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmark.perf.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="results/gpu-check", help="folder for gpu-check.json and gpu-check.md")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="toy sizes (any device): what the test suite runs")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is visible (use --tiny --device cpu to check the path on a CPU)")
    if args.tiny:
        _register_tiny()
    report = {"tiny": args.tiny, "device": describe_device(args.device), "torch": torch.__version__, "parts": {}}
    for name, part in PARTS.items():
        start = time.perf_counter()
        print(f"gpu-check: {name} ...", flush=True)
        try:
            entry = {"result": part(args.tiny, args.device)}
        except Exception as err:  # a failed part is recorded; the other parts still run
            entry = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        entry["seconds"] = time.perf_counter() - start
        report["parts"][name] = entry
        print(f"gpu-check: {name} {'ok' if 'error' not in entry else 'FAILED: ' + entry['error']} "
              f"({entry['seconds']:.1f} s)", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "gpu-check.json", report)
    atomic_write_text(out / "gpu-check.md", _markdown(report))
    print(f"gpu-check: {out / 'gpu-check.json'}, {out / 'gpu-check.md'}")
    return 1 if any("error" in p for p in report["parts"].values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
