"""Class names and zero-shot templates from the packages that ship them.

clip-benchmark's JSON files (installed by `make`, data only) hold the CLIP templates of every
dataset here and the curated class names of several; open_clip holds ImageNet's names; timm
holds ImageNet's WordNet ids in label order. Everything else comes from the dataset itself.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import sys
from functools import lru_cache
from pathlib import Path
from typing import Optional

DEFAULT_TEMPLATES = ("a photo of a {}.",)

_WARNED: set[str] = set()


def _package_file(package: str, *parts: str) -> Optional[Path]:
    """A data file inside an installed package, found without importing the package (open_clip
    and timm import torch; their tables of names do not need it)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0], *parts)
    return path if path.is_file() else None


def _clip_benchmark_file(name: str) -> Optional[Path]:
    return _package_file("clip_benchmark", "datasets", name)  # no import: the package pulls in heavy modules


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


@lru_cache(maxsize=None)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1,000 ImageNet-1k WordNet ids in the standard label order (timm's table)."""
    path = _package_file("timm", "data", "_info", "imagenet_synsets.txt")
    if path is not None:
        wnids = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
        if len(wnids) == 1000:
            return wnids
    from timm.data import ImageNetInfo  # a timm that keeps the table elsewhere

    return tuple(ImageNetInfo("imagenet-1k").label_names())


@lru_cache(maxsize=None)
def imagenet_classnames() -> tuple[str, ...]:
    """open_clip's 1,000 readable ImageNet class names (IMAGENET_CLASSNAMES), read from its
    zero_shot_metadata.py as data."""
    path = _package_file("open_clip", "zero_shot_metadata.py")
    if path is not None:
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "IMAGENET_CLASSNAMES" for t in node.targets):
                names = tuple(ast.literal_eval(node.value))
                if len(names) == 1000:
                    return names
    from open_clip import IMAGENET_CLASSNAMES  # an open_clip that computes the table

    return tuple(IMAGENET_CLASSNAMES)


def readable(name: str) -> str:
    """Folder-style names as words: 'aquarium_fish' -> 'aquarium fish'."""
    return name.replace("_", " ").strip()
