"""Tiny copies of the paper's datasets in their real on-disk formats (as torchvision's tests fake them).

Every image is one solid colour that encodes its label (`color`), so a test can check that each
loaded image still sits beside its own label after listing, splitting, decoding and caching.
"""
from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import scipy.io as sio
from PIL import Image

EUROSAT = ("AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
           "PermanentCrop", "Residential", "River", "SeaLake")


def color(label: int) -> tuple[int, int, int]:
    return (label % 10) * 25 + 10, (label // 10 % 10) * 25 + 10, (label // 100) * 25 + 10


def labels_from_pixels(x: np.ndarray) -> np.ndarray:
    """Invert `color` on decoded (N, 3, H, W) images."""
    r, g, b = (np.rint((x[:, c].reshape(len(x), -1).mean(1) - 10) / 25).astype(int) for c in range(3))
    return r + 10 * g + 100 * b


def gray_labels(x: np.ndarray) -> np.ndarray:
    """Invert the red channel of `color` on grey images (MNIST)."""
    return np.rint((x[:, 0].reshape(len(x), -1).mean(1) - 10) / 25).astype(int)


def solid(label: int, size: tuple[int, int] = (12, 10)) -> Image.Image:
    return Image.new("RGB", size, color(label))


def _save(img: Image.Image, path: Path, fmt: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt, quality=100) if fmt == "JPEG" else img.save(path, fmt)


def _array(labels: list[int], size: int = 32) -> np.ndarray:
    return np.stack([np.full((size, size, 3), color(y), dtype=np.uint8) for y in labels])


def cifar(root: Path, n_classes: int, per_batch: int = 4, test: int = 10) -> dict:
    """cifar-10-batches-py (5 data batches) or cifar-100-python (train/test) pickles + meta."""
    rng = np.random.default_rng(0)
    key = "labels" if n_classes == 10 else "fine_labels"
    folder = root / ("cifar-10-batches-py" if n_classes == 10 else "cifar-100-python")
    folder.mkdir(parents=True)
    names = [f"thing_{i}" for i in range(n_classes)]

    def batch(path: Path, labels: list[int]) -> None:
        data = _array(labels).transpose(0, 3, 1, 2).reshape(len(labels), -1)  # CIFAR rows are CHW
        path.write_bytes(pickle.dumps({"data": data, key: labels}))

    if n_classes == 10:  # shuffled labels, every class in train (the data check requires it)
        labels = rng.permutation(np.arange(5 * per_batch) % 10)
        train = [[int(v) for v in labels[i::5]] for i in range(5)]
        for i, labels in enumerate(train, 1):
            batch(folder / f"data_batch_{i}", labels)
        batch(folder / "test_batch", list(range(test)))
        (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
        return {"train": sum(train, []), "test": list(range(test)), "names": names}
    train = list(range(n_classes)) * 2
    batch(folder / "train", train)
    batch(folder / "test", list(range(n_classes)))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": names}))
    return {"train": train, "test": list(range(n_classes)), "names": names}


def write_idx(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    magic = 0x0800 + array.ndim  # uint8 type code, then the number of dimensions
    path.write_bytes(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape) + array.tobytes())


def mnist(root: Path) -> dict:
    train, test = [i % 10 for i in range(30)], list(range(10))
    for prefix, labels in (("train", train), ("t10k", test)):
        images = np.stack([np.full((28, 28), color(y)[0], dtype=np.uint8) for y in labels])
        write_idx(root / "MNIST" / "raw" / f"{prefix}-images-idx3-ubyte", images)
        write_idx(root / "MNIST" / "raw" / f"{prefix}-labels-idx1-ubyte", np.array(labels, dtype=np.uint8))
    return {"train": train, "test": test}


def svhn(root: Path) -> dict:
    out = {"train": [i % 10 for i in range(20)], "test": list(range(10))}
    for split, labels in out.items():
        x = _array(labels).transpose(1, 2, 3, 0)  # the .mat files store (32, 32, 3, N)
        y = np.array([[10 if v == 0 else v] for v in labels], dtype=np.uint8)  # digit 0 is label 10 there
        (root / "svhn").mkdir(parents=True, exist_ok=True)
        sio.savemat(root / "svhn" / f"{split}_32x32.mat", {"X": x, "y": y})
    return out


def _listed_folder(base: Path, data: Path, classes, name: str, splits: dict[str, int]) -> dict:
    """<data>/<class>/<class>_<n>.jpg and <base>/<name>-<split>.txt listing file names."""
    out = {}
    n = 0
    for split, per_class in splits.items():
        lines, labels = [], []
        for y, c in enumerate(classes):
            for _ in range(per_class):
                n += 1
                _save(solid(y), data / c / f"{c}_{n}.jpg")
                lines.append(f"{c}_{n}.jpg")
                labels.append(y)
        (base / f"{name}-{split}.txt").write_text("\n".join(lines) + "\n")
        out[split] = labels
    return out


def eurosat(root: Path) -> dict:
    return _listed_folder(root / "eurosat", root / "eurosat" / "2750", EUROSAT, "eurosat",
                          {"train": 2, "val": 1, "test": 1})


def resisc45(root: Path) -> dict:
    classes = [f"scene_{i:02d}" for i in range(45)]
    (root / "resisc45").mkdir(parents=True)
    out = _listed_folder(root / "resisc45", root / "resisc45" / "NWPU-RESISC45", classes, "resisc45",
                         {"train": 2, "val": 1, "test": 1})
    del out["val"]  # the official code holds out 10 % of train instead of using resisc45-val.txt
    return {**out, "names": [c.replace("_", " ") for c in classes]}


def gtsrb(root: Path) -> dict:
    base = root / "gtsrb"
    train = [y for y in range(43) for _ in range(2)]
    for i, y in enumerate(train):
        _save(solid(y), base / "GTSRB" / "Training" / f"{y:05d}" / f"{i:05d}_00000.ppm", "PPM")
    test = list(range(43))
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for i, y in enumerate(test):
        _save(solid(y), base / "GTSRB" / "Final_Test" / "Images" / f"{i:05d}.ppm", "PPM")
        rows.append(f"{i:05d}.ppm;12;10;0;0;11;9;{y}")
    (base / "GT-final_test.csv").write_text("\n".join(rows) + "\n")
    return {"train": train, "test": test}


def dtd(root: Path) -> dict:
    base = root / "dtd" / "dtd"
    classes = [f"texture_{i:02d}" for i in range(47)]
    out = {}
    for split, per_class in (("train", 2), ("val", 1), ("test", 1)):
        lines, labels = [], []
        for y, c in enumerate(classes):
            for k in range(per_class):
                name = f"{c}_{split}{k}.jpg"
                _save(solid(y), base / "images" / c / name)
                lines.append(f"{c}/{name}")
                labels.append(y)
        (base / "labels").mkdir(parents=True, exist_ok=True)
        (base / "labels" / f"{split}1.txt").write_text("\n".join(lines) + "\n")
        out[split] = labels
    del out["val"]  # partition 1's val1.txt is unused: the official code holds out 10 % of train1
    return {**out, "names": [c.replace("_", " ") for c in classes]}


def stanford_cars(root: Path) -> dict:
    base = root / "stanford_cars"
    names = [f"Maker Model {i} {2000 + i % 12}" for i in range(196)]
    (base / "devkit").mkdir(parents=True)
    sio.savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array(names, dtype=object)})
    out = {}
    for split, folder, annos in (("train", "cars_train", base / "devkit" / "cars_train_annos.mat"),
                                 ("test", "cars_test", base / "cars_test_annos_withlabels.mat")):
        labels = list(range(196))
        for i, y in enumerate(labels):
            _save(solid(y), base / folder / f"{i + 1:05d}.jpg")
        write_cars_annotations(annos, labels)
        out[split] = labels
    return {**out, "names": names}


def write_cars_annotations(path: Path, labels: list[int]) -> None:
    """Stanford Cars' annotation .mat: image i + 1 (00001.jpg, ...) has 0-based label labels[i]."""
    records = np.zeros(len(labels), dtype=[("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"),
                                            ("bbox_y2", "O"), ("class", "O"), ("fname", "O")])
    for i, y in enumerate(labels):
        records[i] = (1, 1, 11, 9, y + 1, f"{i + 1:05d}.jpg")  # classes are 1-based in the .mat files
    sio.savemat(path, {"annotations": records})


def imagenet(root: Path, wnids: tuple[str, ...]) -> dict:
    out = {}
    for split, folder in (("train", "train"), ("test", "val")):
        for y, w in enumerate(wnids):
            _save(solid(y), root / "imagenet" / folder / w / f"{w}_{split}.JPEG")
        out[split] = list(range(len(wnids)))
    return out


# --- ZSCL's MTIL additions ---------------------------------------------------------------------

def aircraft(root: Path) -> dict:
    data = root / "fgvc-aircraft-2013b" / "data"
    variants = [f"Variant-{i:03d}" for i in range(100)]
    data.mkdir(parents=True)
    (data / "variants.txt").write_text("\n".join(variants) + "\n")
    out, n = {}, 1000000
    for split in ("train", "test"):
        lines = []
        for y, v in enumerate(variants):
            n += 1
            _save(solid(y), data / "images" / f"{n}.jpg")
            lines.append(f"{n} {v}")
        (data / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
        out[split] = list(range(100))
    return {**out, "names": variants}


def caltech101(root: Path) -> dict:
    base = root / "caltech101" / "101_ObjectCategories"
    categories = sorted(["Faces", "Faces_easy", "Leopards", "Motorbikes"] + [f"object_{i:02d}" for i in range(97)])
    for y, c in enumerate(categories):
        for k in range(1, 6):
            _save(solid(y), base / c / f"image_{k:04d}.jpg")
    _save(solid(0), base / "BACKGROUND_Google" / "image_0001.jpg")  # torchvision drops this folder
    return {"n": 101 * 5}


def flowers(root: Path) -> dict:
    base = root / "flowers-102"
    labels = [i % 102 for i in range(306)]
    for i, y in enumerate(labels, 1):
        _save(solid(y), base / "jpg" / f"image_{i:05d}.jpg")
    sio.savemat(base / "imagelabels.mat", {"labels": np.array(labels) + 1})
    ids = np.arange(1, 307)
    sio.savemat(base / "setid.mat", {"trnid": ids[:102], "valid": ids[102:204], "tstid": ids[204:]})
    return {"train": labels[:102], "test": labels[204:]}


def food101(root: Path) -> dict:
    import json

    base = root / "food-101"
    classes = [f"dish_{i:03d}" for i in range(101)]
    out = {}
    for split in ("train", "test"):
        meta = {}
        for y, c in enumerate(classes):
            _save(solid(y), base / "images" / c / f"{split}{y}.jpg")
            meta[c] = [f"{c}/{split}{y}"]
        (base / "meta").mkdir(parents=True, exist_ok=True)
        (base / "meta" / f"{split}.json").write_text(json.dumps(meta))
        out[split] = list(range(101))
    return {**out, "names": [c.replace("_", " ") for c in classes]}


def pets(root: Path) -> dict:
    base = root / "oxford-iiit-pet"
    breeds = [f"breed_{i:02d}" for i in range(37)]
    (base / "annotations").mkdir(parents=True)
    out = {}
    for split, start in (("trainval", 1), ("test", 50)):
        lines = []
        for y, b in enumerate(breeds):
            _save(solid(y), base / "images" / f"{b}_{start}.jpg")
            lines.append(f"{b}_{start} {y + 1} {1 + y % 2} 1")
        (base / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")
        out["train" if split == "trainval" else "test"] = list(range(37))
    return out


def sun397(root: Path, per_class: int = 4) -> dict:
    """4 images per class: ZSCL's seeded 80/20 split then leaves each class some for training."""
    base = root / "SUN397"
    classes = [f"/{c}/{c}place_{i:03d}" for i in range(397) for c in "ab"[i % 2]]
    base.mkdir(parents=True)
    (base / "ClassName.txt").write_text("\n".join(classes) + "\n")
    for y, c in enumerate(classes):
        for k in range(per_class):
            _save(solid(y), base / c.strip("/") / f"sun_{y:03d}{k}.jpg")
    return {"n": 397 * per_class, "names": [c[3:].replace("_", " ") for c in classes]}


def coop_dtd(root: Path, per_split: tuple[int, int, int] = (2, 1, 1)) -> dict:
    """CoOp's DTD layout (tasks/coop.py): dtd/images/<class>/*.jpg and dtd/split_zhou_DescribableTextures.json
    listing [path under images/, label, class name] per split."""
    import json

    classes = [f"banded_{i:02d}" for i in range(47)]
    lists = {}
    for split, per_class in zip(("train", "val", "test"), per_split):
        entries = []
        for y, c in enumerate(classes):
            for k in range(per_class):
                name = f"{c}/{c}_{split}{k}.jpg"
                _save(solid(y), root / "dtd" / "images" / name)
                entries.append([name, y, c])
        lists[split] = entries
    (root / "dtd" / "split_zhou_DescribableTextures.json").write_text(json.dumps(lists))
    return {"lists": lists, "names": [c.replace("_", " ") for c in classes]}
