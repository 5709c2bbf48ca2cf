"""Named task sequences: trained tasks in order, plus eval-only tasks that are never trained."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

from benchmark.errors import CfbenchError

from .offline import fashion_mnist_present
from .registry import get_task, resolve_data_root


@dataclass(frozen=True)
class Sequence:
    name: str
    tasks: tuple[str, ...]
    eval_only: tuple[str, ...] = ()
    description: str = ""


SEQUENCES: dict[str, Sequence] = {
    "demo": Sequence("demo", ("mnist5k", "fashion_mnist"), ("digits", "photo_patches", "faces"),
                     "offline: MNIST-5k -> Fashion-MNIST; never trained: digits, photo patches, faces"),
    "demo-small": Sequence("demo-small", ("mnist5k", "digits"), ("photo_patches", "faces"),
                           "offline, package data only: MNIST-5k -> sklearn digits"),
    "ldifs10": Sequence("ldifs10", ("cars", "cifar10", "cifar100", "dtd", "eurosat", "gtsrb", "mnist", "resisc45",
                                    "svhn", "imagenet"), (),
                        "the LDIFS paper's ten datasets, in the paper's listing order (needs --data-root)"),
    # ZSCL (Zheng et al. 2023) multi-domain task-incremental learning, orders I and II.
    "mtil-order1": Sequence("mtil-order1", ("aircraft", "caltech101", "cifar100", "dtd", "eurosat_mtil", "flowers",
                                            "food101", "mnist", "pets", "cars", "sun397"), (),
                            "ZSCL's MTIL order I (needs --data-root)"),
    "mtil-order2": Sequence("mtil-order2", ("cars", "food101", "mnist", "pets", "flowers", "sun397", "aircraft",
                                            "caltech101", "dtd", "eurosat_mtil", "cifar100"), (),
                            "ZSCL's MTIL order II (needs --data-root)"),
    # The same orders on CoOp's split lists where they exist (tasks/coop.py; DIKI's splits)
    "mtil-order1-coop": Sequence("mtil-order1-coop", ("aircraft", "caltech101_coop", "cifar100", "dtd_coop",
                                                      "eurosat_coop", "flowers_coop", "food101_coop", "mnist",
                                                      "pets_coop", "cars_coop", "sun397_coop"), (),
                                 "MTIL order I on CoOp's split_zhou lists, DIKI's data (needs --data-root)"),
    "mtil-order2-coop": Sequence("mtil-order2-coop", ("cars_coop", "food101_coop", "mnist", "pets_coop",
                                                      "flowers_coop", "sun397_coop", "aircraft", "caltech101_coop",
                                                      "dtd_coop", "eurosat_coop", "cifar100"), (),
                                 "MTIL order II on CoOp's split_zhou lists, DIKI's data (needs --data-root)"),
    # DIKI (Tang et al. 2024) MTIL-FS: order I without EuroSAT, MNIST and Oxford Pets (DIKI/datasets.py:33-34)
    "mtil-fs-diki": Sequence("mtil-fs-diki", ("aircraft", "caltech101_coop", "cifar100", "dtd_coop", "flowers_coop",
                                              "food101_coop", "cars_coop", "sun397_coop"), (),
                             "DIKI's few-shot MTIL-FS: MTIL order I without EuroSAT, MNIST, Pets, on CoOp's "
                             "split lists (needs --data-root)"),
}


_NOTICES: set[str] = set()


def _notice_once(message: str) -> None:
    if message not in _NOTICES:
        _NOTICES.add(message)
        print(message, file=sys.stderr)


def resolve_sequence(name: str, data_root: Optional[str] = None) -> Sequence:
    if name not in SEQUENCES:
        raise CfbenchError(f"unknown sequence {name!r}; known sequences: {', '.join(sorted(SEQUENCES))}")
    seq = SEQUENCES[name]
    if name == "demo" and not fashion_mnist_present(resolve_data_root(data_root)):
        _notice_once("notice: Fashion-MNIST is not installed (Debian package dataset-fashion-mnist); "
                     "the demo runs the 'demo-small' sequence instead")
        seq = SEQUENCES["demo-small"]
    for task in seq.tasks + seq.eval_only:
        get_task(task)
    return seq


def parse_task_list(text: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    if not names:
        raise CfbenchError("--tasks needs a comma-separated list of task names")
    for n in names:
        get_task(n)
    return names
