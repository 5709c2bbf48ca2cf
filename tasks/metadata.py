"""Class names and zero-shot templates from the packages that ship them.

clip-benchmark's JSON files (installed by `make`, data only) hold the CLIP templates of every
dataset here and the curated class names of several; open_clip holds ImageNet's names; timm
holds ImageNet's WordNet ids in label order. Everything else comes from the dataset itself.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from functools import lru_cache
from pathlib import Path
from typing import Optional

DEFAULT_TEMPLATES = ("a photo of a {}.",)

_WARNED: set[str] = set()


def _clip_benchmark_file(name: str) -> Optional[Path]:
    spec = importlib.util.find_spec("clip_benchmark")  # no import: the package pulls in heavy modules
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / name
    return path if path.exists() else None


@lru_cache(maxsize=None)
def _clip_benchmark_json(name: str) -> dict:
    path = _clip_benchmark_file(name)
    if path is None:
        if name not in _WARNED:
            _WARNED.add(name)
            print(f"notice: clip-benchmark's {name} is not installed (pip install --no-deps "
                  "clip-benchmark==1.6.2); using default prompts/class names", file=sys.stderr)
        return {}
    return json.loads(path.read_text())


def templates(key: str) -> tuple[str, ...]:
    """Prompt templates as str.format patterns with one `{}` for the class name."""
    if not key:
        return DEFAULT_TEMPLATES
    found = _clip_benchmark_json("en_zeroshot_classification_templates.json").get(key)
    return tuple(t.replace("{c}", "{}") for t in found) if found else DEFAULT_TEMPLATES


def classnames(key: str) -> Optional[tuple[str, ...]]:
    """clip-benchmark's curated class names, or None where it has none for `key`."""
    found = _clip_benchmark_json("en_classnames.json").get(key)
    return tuple(found) if found else None


def imagenet_wnids() -> tuple[str, ...]:
    """The 1,000 ImageNet-1k WordNet ids in the standard label order."""
    from timm.data import ImageNetInfo

    return tuple(ImageNetInfo("imagenet-1k").label_names())


def imagenet_classnames() -> tuple[str, ...]:
    from open_clip import IMAGENET_CLASSNAMES

    return tuple(IMAGENET_CLASSNAMES)


def readable(name: str) -> str:
    """Folder-style names as words: 'aquarium_fish' -> 'aquarium fish'."""
    return name.replace("_", " ").strip()
