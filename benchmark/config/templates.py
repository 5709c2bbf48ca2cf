"""Zero-shot prompt templates and class names per task: the defaults (clip-benchmark's templates,
the task's curated names) or a protocol's own, stored as data.

`eval.templates` names a YAML file in benchmark/protocols/templates/ (e.g. `ldifs`, `zscl`) or
gives a path to one: {task: [pattern, ...]} with "{}" for the class name. `eval.classnames`
likewise names a file in benchmark/protocols/classnames/ or a path: {task: [name, ...]}, one name
per class in label order, or {task: source} (the dataset's own names, as the source gives them) or
{task: source-readable} (the same with "_" -> " "). A task a file does not list keeps its defaults.
"""
from __future__ import annotations

import string
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional

import tasks as task_registry

from ..errors import CfbenchError
from ..files import parse_yaml, read_text
from .protocols import PROTOCOL_DIR

TEMPLATE_DIR = PROTOCOL_DIR / "templates"
CLASSNAME_DIR = PROTOCOL_DIR / "classnames"


def list_sets(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.yaml"))


def _load_set(folder: Path, name_or_path: str, setting: str, valid: Callable[[str], bool], rule: str,
              keywords: tuple[str, ...] = ()) -> dict:
    path = folder / f"{name_or_path}.yaml"
    if not path.is_file():
        path = Path(name_or_path)
    if not path.is_file():
        raise CfbenchError(f"{setting}: {name_or_path!r} is neither one of {', '.join(list_sets(folder))} "
                           f"nor a YAML file")
    data = parse_yaml(read_text(path, setting), str(path)) or {}
    if not isinstance(data, dict):
        raise CfbenchError(f"{path}: must map task names to lists")
    out = {}
    for task, items in data.items():
        if items in keywords:
            out[str(task)] = items
            continue
        if not isinstance(items, list) or not items or not all(isinstance(i, str) and valid(i) for i in items):
            raise CfbenchError(f"{path}: {task}: {rule}")
        out[str(task)] = tuple(items)
    return out


@lru_cache(maxsize=None)
def load_template_set(name_or_path: str) -> dict[str, tuple[str, ...]]:
    return _load_set(TEMPLATE_DIR, name_or_path, "eval.templates", one_class_slot,
                     "templates must be a non-empty list of strings with exactly one '{}' (the class name) and no "
                     "other format field (write a literal brace as '{{' or '}}')")


def one_class_slot(template: str) -> bool:
    """Exactly one replacement field, `{}`, and nothing `str.format(classname)` would fail on."""
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError:  # an unmatched brace
        return False
    return fields == [("", "", None)]


@lru_cache(maxsize=None)
def load_classname_set(name_or_path: str) -> dict[str, tuple[str, ...]]:
    return _load_set(CLASSNAME_DIR, name_or_path, "eval.classnames", lambda n: bool(n.strip()),
                     "class names must be `source`, `source-readable` or a non-empty list of non-empty strings",
                     keywords=("source", "source-readable"))


def task_templates(task: str, template_set: Optional[str] = None) -> tuple[str, ...]:
    if template_set is not None:
        found = load_template_set(template_set).get(task)
        if found:
            return found
    return task_registry.get_task(task).templates


def task_class_names(task: str, data_root: Optional[str] = None, name_set: Optional[str] = None) -> tuple[str, ...]:
    names = task_registry.task_classes(task, data_root)
    if name_set is not None:
        found = load_classname_set(name_set).get(task)
        if found in ("source", "source-readable"):
            source = task_registry.task_classes(task, data_root, source=True)
            return source if found == "source" else tuple(n.replace("_", " ") for n in source)
        if found:
            if len(found) != len(names):
                raise CfbenchError(f"eval.classnames {name_set}: {task} has {len(names)} classes, "
                                   f"the file names {len(found)}")
            return found
    return names
