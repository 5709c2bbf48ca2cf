"""Raw vs compact cache: bytes per image, decode throughput, training throughput (BENCHMARKS.md).

    python -m benchmark.perf_cache [--device cuda] [--images 4096] [--batch 256] [--steps 40]

Needs only torch, torchvision, timm, numpy, Pillow and scikit-image (its sample photographs are
the real images): it runs on a bare GPU machine without the suite's other dependencies. The
model is ViT-B/32 (timm's `vit_base_patch32_clip_224`, CLIP's image tower, random weights: only
the cost matters). Ratios are measured in the same process, variants alternated.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image

import tasks as registry
from tasks.base import ArraySource, FileSource, TensorSplit
from tasks.cache import cached_images
from tasks.compact import JpegImages, gather
from tasks.offline import PHOTOS, _patches, _photo

from ..run.batches import TensorBatches

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1) * 255
RESIDENT = "uint8 tensors resident on the device"
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1) * 255


def load_photos(folder: Optional[str] = None) -> dict[str, np.ndarray]:
    """The 14 scikit-image photographs (uint8 RGB), or PNG copies of them in `folder` (machines
    whose scikit-image would download some of them); `--save-photos DIR` writes such copies."""
    if folder:
        return {name: np.asarray(Image.open(Path(folder) / f"{name}.png").convert("RGB")) for name in PHOTOS}
    return {name: _photo(name) for name in PHOTOS}


def photo_files(folder: Path, photos: dict[str, np.ndarray], per_class: int, rows: tuple[float, float] = (0.0, 1.0),
                seed: int = 0, quality: int = 95) -> FileSource:
    """Crops (160 px to the photo's size, aspect 3:4 to 4:3) of each photograph, saved as JPEG
    files like a real dataset; label = which photo. `rows`: the fraction of each photo's height
    the crops come from (disjoint train / test regions)."""
    rng, paths, labels = np.random.default_rng(seed), [], []
    folder.mkdir(parents=True, exist_ok=True)
    for label, (name, img) in enumerate(photos.items()):
        lo, hi = int(rows[0] * img.shape[0]), int(rows[1] * img.shape[0])
        for k in range(per_class):
            h = int(rng.integers(min(160, hi - lo), min(hi - lo, img.shape[1]) + 1))
            w = min(img.shape[1], int(h * rng.uniform(0.75, 1.33)))
            top, left = int(rng.integers(lo, hi - h + 1)), int(rng.integers(0, img.shape[1] - w + 1))
            paths.append(folder / f"{name}-{seed}-{k}.jpg")
            Image.fromarray(img[top:top + h, left:left + w]).save(paths[-1], quality=quality)
            labels.append(label)
    return FileSource(paths, labels)


def _timed(fn: Callable[[], int], device: str) -> float:
    """Images per second of one call of fn (which returns how many images it processed)."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    n = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def alternate(variants: dict[str, Callable[[], int]], repeats: int, device: str) -> dict[str, float]:
    """Median images/s of each variant over `repeats` rounds, variants interleaved."""
    for fn in variants.values():
        fn()  # warm-up: allocator, cudnn / nvJPEG handles, page cache
    runs: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            runs[name].append(_timed(fn, device))
    return {k: statistics.median(v) for k, v in runs.items()}


def decode_rates(stores: dict[str, object], batch: int, batches: int, threads: int) -> dict[str, Callable[[], int]]:
    """Random-order batches read to uint8 on the CPU (raw: memmap gather; compact: decode)."""
    def read(store) -> int:
        n = len(store)
        for _ in range(batches):
            gather(store, torch.randint(n, (batch,)), "cpu").max()  # touch every byte
        return batch * batches

    for s in stores.values():
        if isinstance(s, JpegImages):
            s.workers = threads
            s._pool = None
    return {name: (lambda s=s: read(s)) for name, s in stores.items()}


def training_loop(split: TensorSplit, model: torch.nn.Module, batch: int, steps: int, device: str) -> Callable[[], int]:
    """ViT-B/32 steps (bf16 autocast on CUDA, AdamW) on batches read the way the suite's loader
    reads them (`benchmark.run.batches.TensorBatches`: prefetch thread for compact stores)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    mean, std = MEAN.to(device), STD.to(device)
    resident = isinstance(split.x, torch.Tensor) and split.x.device.type == "cuda"
    pin = device == "cuda" and isinstance(split.x, torch.Tensor) and not resident

    def run() -> int:
        loader = TensorBatches(split, 0, batch, pin=pin, steps=steps, device=device)
        for x, y, _, _ in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                loss = torch.nn.functional.cross_entropy(model((x.float() - mean) / std), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return batch * steps

    return run


def report(title: str, rates: dict[str, float], baseline: str) -> list[str]:
    lines = [f"## {title}"]
    for name, r in rates.items():
        ratio = "" if name == baseline else f"  = {r / rates[baseline]:.2f} x {baseline}"
        lines.append(f"{name:<44} {r:9.0f} img/s{ratio}")
    return lines


def run(device: str, images: int, batch: int, steps: int, repeats: int, size: int = 224,
        photos_dir: Optional[str] = None) -> str:
    import timm

    threads = torch.get_num_threads()
    gpu = torch.cuda.get_device_name() if device == "cuda" else None
    lines = [f"# cfbench perf_cache: {images} photo crops at {size} px, device {device} ({gpu or 'cpu'}), "
             f"{threads} threads, torch {torch.__version__}"]
    with tempfile.TemporaryDirectory() as tmp:
        photos = load_photos(photos_dir)
        files = photo_files(Path(tmp) / "photos", photos, max(1, images // len(PHOTOS)))
        idx, cache = np.arange(len(files)), str(Path(tmp) / "cache")
        t0 = time.perf_counter()
        raw = cached_images("photos", "train", files, idx, size, cache, "raw")
        t_raw = time.perf_counter() - t0
        t0 = time.perf_counter()
        jpeg = cached_images("photos", "train", files, idx, size, cache, "compact")
        t_jpeg = time.perf_counter() - t0
        rng = np.random.default_rng(0)
        cut = np.concatenate([_patches(p, (0, p.shape[0]), images // len(photos), 32, rng) for p in photos.values()])
        patches = ArraySource(cut, np.zeros(len(cut), dtype=np.int64))
        native = cached_images("patches", "train", patches, np.arange(len(patches)), size, cache, "compact")
        lines.append(f"stored bytes per image at {size} px: raw {raw[0].numel():,}; JPEG q90 4:4:4 "
                     f"{jpeg.data.nbytes / len(jpeg):,.0f} (1/{raw[0].numel() * len(jpeg) / jpeg.data.nbytes:.1f}); "
                     f"native 32x32 patches {native.pixels[0].nbytes:,}; build {len(files) / t_raw:.0f} img/s raw, "
                     f"{len(files) / t_jpeg:.0f} img/s JPEG")
        stores = {"raw memmap gather": raw, "JPEG decode": jpeg}
        per_core = alternate(decode_rates(stores, 64, 8, 1), repeats, "cpu")
        lines += report("CPU read to uint8, 1 thread (per core)", per_core, "raw memmap gather")
        all_cores = alternate(decode_rates(stores, 256, 4, threads), repeats, "cpu")
        lines += report(f"CPU read to uint8, {threads} threads", all_cores, "raw memmap gather")
        torch.manual_seed(0)
        model = timm.create_model("vit_base_patch32_clip_224", pretrained=False, num_classes=len(PHOTOS),
                                  img_size=size).to(device)
        y = torch.from_numpy(files.labels)
        variants = {RESIDENT: TensorSplit(raw.to(device).clone(), y.to(device)),
                    "raw memmap (pinned copy)": TensorSplit(raw, y),
                    "compact JPEG (nvJPEG)" if device == "cuda" else "compact JPEG": TensorSplit(jpeg, y),
                    "compact native 32 px (device resize)": TensorSplit(native, torch.zeros(len(native),
                                                                                            dtype=torch.long))}
        if device == "cuda":
            cpu_jpeg = JpegImages(jpeg.data, jpeg.offsets, size, workers=threads, gpu_decode=False)
            variants["compact JPEG (CPU threads)"] = TensorSplit(cpu_jpeg, y)
        loops = {k: training_loop(s, model, batch, steps, device) for k, s in variants.items()}
        rates = alternate(loops, repeats, device)
        lines += report(f"ViT-B/32 training, batch {batch}, {steps} steps, "
                        f"{'bf16 autocast' if device == 'cuda' else 'fp32'}", rates, RESIDENT)
    return "\n".join(lines)


def device_agreement(device: str, images: int = 560, size: int = 224, photos_dir: Optional[str] = None) -> str:
    """Compact stores decoded on `device` (nvJPEG, the device-side resize) vs on the CPU."""
    lines = [f"## compact stores decoded on {device} vs on the CPU ({images} images, {size} px)"]
    with tempfile.TemporaryDirectory() as tmp:
        photos = load_photos(photos_dir)
        files = photo_files(Path(tmp) / "photos", photos, max(1, images // len(photos)))
        rng = np.random.default_rng(0)
        cut = np.concatenate([_patches(p, (0, p.shape[0]), images // len(photos), 32, rng) for p in photos.values()])
        patches = ArraySource(cut, np.zeros(len(cut), dtype=np.int64))
        for name, source in (("JPEG", files), ("native 32 px", patches)):
            store = cached_images(name.split()[0], "test", source, np.arange(len(source)), size, str(Path(tmp) / "c"),
                                  "compact")
            cpu = store.gather(np.arange(len(store)), "cpu").int()
            dev = store.gather(np.arange(len(store)), device).cpu().int()
            diff = (cpu - dev).abs()
            lines.append(f"{name:<14} max |diff| {int(diff.max())}  mean {diff.float().mean():.5f}  "
                         f"pixels differing {100 * (diff > 0).float().mean():.3f} %")
    return "\n".join(lines)


def accuracy_effect(size: int = 224, per_class: tuple[int, int] = (40, 60), photos_dir: Optional[str] = None) -> str:
    """Pretrained EfficientNet-Lite0 (packaged ImageNet weights) linear probes, raw vs compact
    cache, on the offline photo tasks at `size` px: which-photo crops saved as JPEG files (stored
    as JPEG), and the array tasks photo_patches, faces and digits (stored natively)."""
    # the encoder and the probes (Avalanche, open_clip, scikit-learn) only for this optional part:
    # the rest of the benchmark runs on a bare GPU machine
    from ..evaluation.evaluate import extract_features
    from ..evaluation.probe import accuracy, fit_probe
    from ..models.factory import create_model

    encoder = create_model("efficientnet_lite0", "package", size).eval()
    lines = [f"## pretrained LP accuracy (EfficientNet-Lite0, {size} px, sklearn C=1 probe): raw vs compact"]
    with tempfile.TemporaryDirectory() as tmp:
        photos = load_photos(photos_dir)
        sets = {"photo crops (JPEG files)": (photo_files(Path(tmp) / "tr", photos, per_class[0], (0.0, 0.6), seed=1),
                                             photo_files(Path(tmp) / "te", photos, per_class[1], (0.6, 1.0), seed=2))}
        for name in ("photo_patches", "faces", "digits"):
            found = registry.loaded_task(name)
            sets[name] = (found.splits["train"], found.splits["test"])
        for name, (train, test) in sets.items():
            acc, forms = {}, {}
            for fmt in ("raw", "compact"):
                feats = []
                for split, source in (("train", train), ("test", test)):
                    x = cached_images(f"acc-{name.split()[0]}", split, source, np.arange(len(source)), size,
                                      str(Path(tmp) / "cache"), fmt)
                    forms[fmt] = type(x).__name__
                    feats.append(extract_features(encoder, x, 64))
                probe = fit_probe(feats[0], torch.from_numpy(train.labels), int(train.labels.max()) + 1)
                acc[fmt] = accuracy(probe.logits(feats[1]), torch.from_numpy(test.labels))
            lines.append(f"{name:<26} train {len(train):>5} test {len(test):>5}  raw {acc['raw']:6.2f}  "
                         f"compact ({forms['compact']}) {acc['compact']:6.2f}  delta {acc['compact'] - acc['raw']:+.2f}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--photos", help="folder of PNG copies of the photographs (default: scikit-image's)")
    p.add_argument("--agreement", action="store_true", help="instead: compact stores decoded on --device vs on "
                   "the CPU (max / mean pixel difference)")
    p.add_argument("--accuracy", action="store_true", help="instead: pretrained LP accuracy, raw vs compact (CPU; "
                   "needs the suite's packaged EfficientNet-Lite0)")
    p.add_argument("--save-photos", metavar="DIR", help="write PNG copies of the photographs to DIR and exit")
    args = p.parse_args()
    if args.save_photos:
        Path(args.save_photos).mkdir(parents=True, exist_ok=True)
        for name, img in load_photos().items():
            Image.fromarray(img).save(Path(args.save_photos) / f"{name}.png")
        return
    torch.set_num_threads(args.threads)
    if args.agreement:
        print(device_agreement(args.device, photos_dir=args.photos), flush=True)
        return
    if args.accuracy:
        print(accuracy_effect(photos_dir=args.photos), flush=True)
        return
    print(run(args.device, args.images, args.batch, args.steps, args.repeats, photos_dir=args.photos), flush=True)


if __name__ == "__main__":
    main()
