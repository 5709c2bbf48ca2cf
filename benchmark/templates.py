"""Zero-shot prompt templates per task: clip-benchmark's by default, or a protocol's own set.

`eval.templates` names a YAML file in benchmark/protocols/templates/ (e.g. `ldifs`, the official
LDIFS code's templates) or gives a path to one: {task: [pattern, ...]} with "{}" for the class
name. A task the file does not list keeps its default templates.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Optional

import yaml

import tasks as task_registry

from .config import PROTOCOL_DIR
from .errors import CfbenchError

TEMPLATE_DIR = PROTOCOL_DIR / "templates"


def list_template_sets() -> list[str]:
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.yaml"))


@lru_cache(maxsize=None)
def load_template_set(name_or_path: str) -> dict[str, tuple[str, ...]]:
    path = TEMPLATE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        path = Path(name_or_path)
    if not path.is_file():
        raise CfbenchError(f"eval.templates: {name_or_path!r} is neither a template set "
                           f"({', '.join(list_template_sets())}) nor a YAML file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (UnicodeDecodeError, yaml.YAMLError) as err:
        raise CfbenchError(f"{path}: not a readable YAML file ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise CfbenchError(f"{path}: must map task names to lists of templates")
    out = {}
    for task, patterns in data.items():
        if (not isinstance(patterns, list) or not patterns
                or not all(isinstance(p, str) and p.count("{}") == 1 for p in patterns)):
            raise CfbenchError(f"{path}: {task}: templates must be a non-empty list of strings with one '{{}}' each")
        out[str(task)] = tuple(patterns)
    return out


def task_templates(task: str, template_set: Optional[str] = None) -> tuple[str, ...]:
    if template_set is not None:
        found = load_template_set(template_set).get(task)
        if found:
            return found
    return task_registry.get_task(task).templates
