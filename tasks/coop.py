"""The MTIL datasets on CoOp's `split_zhou` lists (Zhou et al.'s CoOp; DIKI reads them: its
docs/datasets.md:3, DIKI/MTIL_datasets/*.py), beside ZSCL's splits of the same datasets: the per-task
split option. `<task>_coop` is `<task>` with CoOp's train / val / test lists and class names.

Layout (CoOp's DATA.md): `<dir>/split_zhou_<Name>.json` = {"train" | "val" | "test": [[path under
<dir>/<images>, label, class name], ...]}. Aircraft (official lists as ZSCL's), CIFAR-100 and MNIST
(official test, random validation) have no split_zhou list: DIKI splits them itself.
"""
from __future__ import annotations

from pathlib import Path

from benchmark.errors import CfbenchError
from benchmark.files import read_json

from .base import FileSource, LoadedTask, Task, TaskIncomplete, TaskUnavailable

SPLITS = ("train", "val", "test")
LIST_BYTES = 64 * 1024 ** 2

# cfbench task: (CoOp folder, images folder under it, split list, classes, the ZSCL-split task it mirrors,
# the list's train / val / test sizes as CoOp's DATASETS.md and paper (Table 5) give them)
COOP = {
    "caltech101_coop": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", 100, "caltech101",
                        "4,128 train / 1,649 val / 2,465 test"),
    "dtd_coop": ("dtd", "images", "split_zhou_DescribableTextures.json", 47, "dtd",
                 "2,820 train / 1,128 val / 1,692 test"),
    "eurosat_coop": ("eurosat", "2750", "split_zhou_EuroSAT.json", 10, "eurosat_mtil",
                     "13,500 train / 5,400 val / 8,100 test"),
    "flowers_coop": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json", 102, "flowers",
                     "4,093 train / 1,633 val / 2,463 test"),
    "food101_coop": ("food-101", "images", "split_zhou_Food101.json", 101, "food101",
                     "50,500 train / 20,200 val / 30,300 test"),
    "pets_coop": ("oxford_pets", "images", "split_zhou_OxfordPets.json", 37, "pets",
                  "2,944 train / 736 val / 3,669 test"),
    "cars_coop": ("stanford_cars", "", "split_zhou_StanfordCars.json", 196, "cars",
                  "6,509 train / 1,635 val / 8,041 test"),
    "sun397_coop": ("sun397", "SUN397", "split_zhou_SUN397.json", 397, "sun397",
                    "15,880 train / 3,970 val / 19,850 test"),
}


def _entries(data, split: str, where: Path) -> list:
    entries = data.get(split) if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise TaskIncomplete(f"{where}: no {split!r} list")
    for entry in entries:
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str) and
                isinstance(entry[1], int) and not isinstance(entry[1], bool) and isinstance(entry[2], str)):
            raise TaskIncomplete(f"{where}: each {split} entry must be [path, label, class name], "
                                 f"not {str(entry)[:80]}")
    return entries


def coop_loader(folder: str, images: str, listing: str, classes: int):
    def load(root: Path) -> LoadedTask:
        where = root / folder / listing
        if not where.is_file():
            raise TaskUnavailable(f"{where} is missing (CoOp's split list: github.com/KaiyangZhou/CoOp DATASETS.md)")
        try:
            data = read_json(where, "split_zhou list")
        except CfbenchError as err:
            raise TaskIncomplete(str(err)) from None
        base = root / folder / images if images else root / folder
        names: dict[int, str] = {}
        splits = {}
        for split in SPLITS:
            entries = _entries(data, split, where)
            for path, label, name in entries:
                if not 0 <= label < classes or names.setdefault(label, name) != name:
                    raise TaskIncomplete(f"{where}: label {label} ({name!r}) is out of range or names two classes")
                if Path(path).is_absolute() or ".." in Path(path).parts:
                    raise TaskIncomplete(f"{where}: {path!r} is not a path inside {base}")
            splits[split] = FileSource([base / p for p, _, _ in entries], [y for _, y, _ in entries])
        if len(names) != classes:
            raise TaskIncomplete(f"{where}: {len(names)} classes, CoOp's list has {classes}")
        return LoadedTask(tuple(names[i].replace("_", " ") for i in range(classes)), splits,
                          tuple(names[i] for i in range(classes)))
    return load


def coop_tasks(mirrored: dict[str, Task]) -> tuple[Task, ...]:
    """The `_coop` tasks, with the prompt templates of the tasks they mirror."""
    return tuple(
        Task(name, classes, coop_loader(folder, images, listing, classes),
             f"{mirrored[base].source}, on CoOp's split_zhou list", mirrored[base].license, sizes,
             f"CoOp's fixed train / val / test lists (the val list is the validation split; {base}: ZSCL's split)",
             f"{folder}/{{{images + '/, ' if images else ''}{listing}}} (CoOp's DATASETS.md layout)",
             mirrored[base].templates_key, anchors=(f"{folder}/{listing}",))
        for name, (folder, images, listing, classes, base, sizes) in COOP.items())
