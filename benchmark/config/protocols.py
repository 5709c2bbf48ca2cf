"""Protocols: named presets of every setting, as data (benchmark/protocols/NAME.yaml): `settings`
(the preset laid under a user's config), `rows` (settings of one strategy's runs alone: RunConfig.rows), `supplied` (what the user must give: a file the
protocol cannot ship) and a description. A protocol is named, never given as a path."""
from __future__ import annotations

import copy
import functools
import re
from pathlib import Path

from ..errors import CfbenchError
from ..files import read_yaml_mapping

PROTOCOL_DIR = Path(__file__).parent.parent / "protocols"
PROTOCOL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def list_protocols() -> dict[str, str]:
    """{name: one-line description} of the presets in benchmark/protocols/."""
    return {p.stem: str(read_yaml_mapping(p).get("description", "")).strip() for p in sorted(PROTOCOL_DIR.glob("*.yaml"))}


def protocol_description(name: str) -> str:
    return list_protocols().get(name, "")


def protocol_settings(name: str) -> dict:
    # a name, never a path: `--protocol ../x` must not read a file outside benchmark/protocols/
    if not isinstance(name, str) or not PROTOCOL_NAME.fullmatch(name) or not (PROTOCOL_DIR / f"{name}.yaml").is_file():
        raise CfbenchError(f"unknown protocol {str(name)[:80]!r}; known: {', '.join(list_protocols())}")
    return {**copy.deepcopy(_settings(name)), "protocol": name}


@functools.lru_cache(maxsize=None)
def _settings(name: str) -> dict:
    """A packaged protocol's settings, read once per process (callers get a copy)."""
    data = read_yaml_mapping(PROTOCOL_DIR / f"{name}.yaml")
    settings, rows = data.get("settings") or {}, data.get("rows") or {}
    if not isinstance(settings, dict) or not isinstance(rows, dict):
        raise CfbenchError(f"{PROTOCOL_DIR / name}.yaml: settings and rows must be mappings")
    return {**settings, "rows": rows} if rows else settings


def protocol_supplied(name: str) -> dict[str, str]:
    """{dotted setting: what the user supplies there}: values a protocol needs but cannot ship (a
    file of captions); the preset leaves them null, and a run that gives one follows the protocol."""
    supplied = read_yaml_mapping(PROTOCOL_DIR / f"{name}.yaml").get("supplied") or {}
    return {str(k): str(v) for k, v in supplied.items()}
