"""Named task sequences: trained tasks in order, plus eval-only tasks that are never trained."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

from benchmark.errors import CfbenchError

from .offline import fashion_mnist_present
from .registry import get_task


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
    if name == "demo" and not fashion_mnist_present(data_root):
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
