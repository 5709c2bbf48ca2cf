"""The compact cache: every stored form against the PIL reference, format choice, integrity."""
import glob
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tasks
from tasks.loading import load_split
from benchmark.cli import main
from benchmark.config.plan import choose_cache_format
from tasks.base import ArraySource, FileSource
from tasks.cache import cached_images, clean_stale_tmp, to_square_uint8
from tasks.compact import JpegImages, NativeImages, gather
from tasks.offline import PHOTOS, _photo
from tests.helpers import THREADS, tiny_config

FOOLBOX = Path(__import__("sysconfig").get_paths()["purelib"]) / "foolbox" / "data"


def _reference(source, size: int) -> np.ndarray:
    return np.stack([to_square_uint8(source.read(i, size), size) for i in range(len(source))]).astype(int)


def _real_arrays() -> dict[str, np.ndarray]:
    """Real low-resolution images: CIFAR-10 (32x32 RGB), MNIST (28x28 grey), LFW faces (float)."""
    from skimage.data import lfw_subset

    cifar = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in sorted(glob.glob(str(FOOLBOX / "cifar10_*")))])
    mnist = np.stack([np.asarray(Image.open(f)) for f in sorted(glob.glob(str(FOOLBOX / "mnist_*")))])
    return {"cifar10": cifar, "mnist": mnist, "faces (float64)": lfw_subset()[:20]}


@pytest.mark.parametrize("size", [224, 64, 32])
def test_native_pixels_resized_on_the_device_match_pil(size, tmp_path):
    """Source pixels + a per-batch torch resize vs PIL's resize of each image: at most 2 levels
    apart anywhere and < 0.01 levels on average (PIL's two uint8 passes are reproduced; torch's
    antialiased bicubic uses PIL's a = -0.5 kernel). The raw cache stores exactly these pixels."""
    for name, images in _real_arrays().items():
        source = ArraySource(images, np.zeros(len(images)))
        store = cached_images(name.split()[0], "test", source, np.arange(len(images)), size, str(tmp_path), "compact")
        assert isinstance(store, NativeImages) and store.pixels.shape[2:] == images.shape[1:3]
        diff = np.abs(store[:].numpy().astype(int) - _reference(source, size))
        assert diff.max() <= 2 and diff.mean() < 0.01, (name, size, diff.max(), diff.mean())
        raw = cached_images(name.split()[0], "test", source, np.arange(len(images)), size, str(tmp_path), "raw")
        assert isinstance(raw, torch.Tensor) and torch.equal(raw, store[:])  # one resize for both formats


def _photo_files(folder: Path, n: int = 24) -> FileSource:
    """Real photographs (scikit-image) cut at random sizes and saved as PNG files."""
    rng, paths = np.random.default_rng(0), []
    for k in range(n):
        img = _photo(PHOTOS[k % len(PHOTOS)])
        h = int(rng.integers(160, min(img.shape[:2]) + 1))
        w = min(int(h * 1.3), img.shape[1])
        top, left = int(rng.integers(0, img.shape[0] - h + 1)), int(rng.integers(0, img.shape[1] - w + 1))
        paths.append(folder / f"{k}.png")
        Image.fromarray(img[top:top + h, left:left + w]).save(paths[-1])
    return FileSource(paths, list(range(n)))


def test_jpeg_store_is_the_pil_square_within_jpeg_error(tmp_path):
    """Larger sources: the PIL square, JPEG q90 4:4:4, decoded in a batch. Measured on these photos:
    mean PSNR 39.8 dB, worst image 35.7 dB / 3.0 levels mean error (textures: gravel, grass); each
    image must keep >= 33 dB and a mean error <= 3.5 levels."""
    source = _photo_files(tmp_path)
    store = cached_images("photos", "test", source, np.arange(len(source)), 224, str(tmp_path / "c"), "compact")
    assert isinstance(store, JpegImages) and len(store) == len(source)
    ref, got = _reference(source, 224), store[:].numpy().astype(int)
    assert got.shape == ref.shape == (len(source), 3, 224, 224)
    for r, g in zip(ref, got):
        mse = ((r - g) ** 2).mean()
        assert 10 * np.log10(255 ** 2 / mse) >= 33 and np.abs(r - g).mean() <= 3.5
    # the batch decoder (libjpeg-turbo via torchvision) gives PIL's decode of the stored file exactly
    for i in (0, 7):
        pil = np.asarray(Image.open(__import__("io").BytesIO(store.encoded(i).numpy().tobytes())).convert("RGB"))
        assert np.array_equal(pil.transpose(2, 0, 1), got[i])
    # gathers in any order, singly, by slice and by tensor
    order = torch.tensor([5, 0, 23, 5])
    assert torch.equal(gather(store, order), store[:][order]) and torch.equal(store[3], store[:][3])
    # compact stores are 1/8 of raw or smaller on real photos at 224 px
    assert store.data.nbytes < len(source) * 3 * 224 * 224 / 6


def test_trainval_concatenates_compact_stores(tmp_path):
    import tests.dataset_fixtures as fx

    fx.eurosat(tmp_path)  # a source with a fixed val split
    root = str(tmp_path)
    parts = [load_split("eurosat", s, 24, root, cache_format="compact") for s in ("train", "val")]
    both = load_split("eurosat", "trainval", 24, root, cache_format="compact")
    assert len(both) == len(parts[0]) + len(parts[1])
    assert torch.equal(both.x[:], torch.cat([parts[0].x[:], parts[1].x[:]]))
    pick = torch.tensor([len(parts[0]), 0, len(both) - 1, 1])
    assert torch.equal(gather(both.x, pick), torch.cat([parts[0].x[:], parts[1].x[:]])[pick])


def test_auto_picks_raw_while_the_run_fits_the_budget(tmp_path):
    cfg = tiny_config(tmp_path, {"cache_format": "auto", "model": {"image_size": 32}})
    trained, evals = ("digits", "faces"), ("digits", "faces", "photo_patches")
    images = sum(tasks.split_count(n, s, None, cap, 0) for n, s, cap in
                 {("digits", "train", 16), ("faces", "train", 16)}
                 | {(n, "train", 12) for n in evals} | {(n, "test", 10) for n in evals})
    raw_gb = images * 3 * 32 * 32 / 1e9
    assert choose_cache_format(cfg.replace(cache_budget_gb=raw_gb * 1.001), trained, evals) == "raw"
    assert choose_cache_format(cfg.replace(cache_budget_gb=raw_gb * 0.999), trained, evals) == "compact"
    assert choose_cache_format(cfg.replace(cache_format="raw", cache_budget_gb=1e-9), trained, evals) == "raw"


@pytest.mark.parametrize("form", ["compact", "raw"])
def test_a_corrupt_or_truncated_entry_is_detected_and_rebuilt(form, tmp_path, caplog):
    source = _photo_files(tmp_path, 6) if form == "compact" else ArraySource(_real_arrays()["cifar10"], np.zeros(20))
    idx = np.arange(len(source))
    first = cached_images("t", "test", source, idx, 64, str(tmp_path / "c"), form)
    first = first[:].clone()
    data = sorted(p for p in (tmp_path / "c" / "t").iterdir() if p.suffix in (".bin", ".npy") and "offsets" not in p.name)
    assert len(data) == 1
    blob = bytearray(data[0].read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # one flipped byte inside an image
    data[0].write_bytes(bytes(blob))
    again = cached_images("t", "test", source, idx, 64, str(tmp_path / "c"), form)
    assert "does not match its manifest" in caplog.text and torch.equal(again[:], first)
    data[0].write_bytes(data[0].read_bytes()[:-100])  # truncated
    assert torch.equal(cached_images("t", "test", source, idx, 64, str(tmp_path / "c"), form)[:], first)


def test_stale_temporary_files_of_dead_builds_are_removed(tmp_path):
    dead = 2 ** 22 + 12345  # above the default pid_max: no such process
    stale, alive = tmp_path / f".x.npy.{dead}.tmp", tmp_path / f".y.npy.{os.getpid()}.tmp"
    stale.write_bytes(b"1"), alive.write_bytes(b"2")
    clean_stale_tmp(tmp_path)
    assert not stale.exists() and alive.exists()


def test_compact_run_equals_raw_run_for_array_sources(tmp_path, monkeypatch):
    """Array sources are resized by the same code in both formats, so a whole run (training
    batches decoded ahead in a thread, LP-init, evaluation) gives the raw run's matrices. Each run
    evaluates its own pretrained row (the row shared by the runs of one process is keyed by the
    format too: the compact run once reused the raw run's)."""
    import benchmark.run.runner as runner

    rounds, evaluate_round = [], runner.evaluate_round
    monkeypatch.setattr(runner, "_PRETRAINED_ROUNDS", {})
    monkeypatch.setattr(runner, "evaluate_round", lambda *a, **k: rounds.append(k["desc"]) or evaluate_round(*a, **k))
    out = {}
    small = tmp_path / "small.yaml"
    small.write_text("train: {max_train_per_class: 24}\neval: {probe_max_per_class: 16, test_max_per_class: 16}\n"
                     "figures: false\n")
    for form in ("raw", "compact"):
        folder = tmp_path / form
        assert main(["run", str(small), "--tasks", "photo_patches", "--eval-only", "faces", "--image-size", "40", "--epochs", "1",
                     "--cache-format", form, "--cache-dir", str(tmp_path / "cache"), "--out", str(folder),
                     "--threads", str(THREADS), "--strategy", "ft"]) == 0
        run = next(folder.glob("*/ft-s0"))
        assert f"cache {form}" in (run / "log.txt").read_text()
        assert json.loads((run / "metrics.json").read_text())
        out[form] = {p.name: p.read_bytes() for p in (run / "matrices").glob("*.csv")}
        tasks.clear_memory()
    assert out["raw"] and out["raw"] == out["compact"]
    assert rounds.count("eval pretrained") == 2


def test_sizes_are_reported_before_anything_is_built(tmp_path, capsys):
    """`data check --sizes`: raw and native bytes exact, JPEG estimated from a sample; no cache written."""
    from tasks.cache import estimated_bytes
    from tasks.loading import cache_sizes

    digits = cache_sizes("digits", 32)  # 1,797 8x8 grey images, kept natively
    assert digits == {"images": 1797, "raw": 1797 * 3 * 32 * 32, "compact": 1797 * 8 * 8, "form": "native"}
    source = _photo_files(tmp_path, 24)
    estimate = estimated_bytes(source, np.arange(24), 224, sample=8)
    built = cached_images("p", "test", source, np.arange(24), 224, str(tmp_path / "c"), "compact")
    assert estimate["form"] == "jpeg" and abs(estimate["compact"] / built.data.nbytes - 1) < 0.2
    cache = Path(os.environ["CFBENCH_CACHE"])
    before = sorted(cache.rglob("*"))
    assert main(["data", "check", "--tasks", "digits,faces", "--sizes", "--image-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "compact GB" in out and out.strip().splitlines()[-1].split()[:2] == ["total", str(1797 + 200)]
    assert sorted(cache.rglob("*")) == before
    assert main(["data", "check", "--tasks", "digits", "--sizes", "--image-size", "4"]) == 2
