"""Plugin state for checkpoints as tensors and plain types only, so `--resume` can load
`state.pt` with `torch.load(weights_only=True)`: a run folder from someone else cannot run code.

A plugin lists what `--resume` restores in `checkpoint_attrs`. Modules are saved as their
state dicts and rebuilt on load from the run's own model (a copy of its encoder or of its image
tower alone, or of the whole multi-head model) with that state; Avalanche's ParamData (EWC) and LwF helper become dicts.
"""
from __future__ import annotations

import copy
from collections import defaultdict
from typing import Any

import torch
from avalanche.training.regularization import LearningWithoutForgetting
from avalanche.training.utils import ParamData

KIND = "__cfbench__"


def export_state(value: Any, model: torch.nn.Module) -> Any:
    """`value` as tensors, numbers, strings, None, lists and dicts."""
    if isinstance(value, torch.nn.Module):
        template = "model" if type(value) is not type(model.encoder) else \
            "image_tower" if getattr(value, "image_tower_only", False) else "encoder"
        frozen = [n for n, p in value.named_parameters() if not p.requires_grad]
        return {KIND: "module", "template": template, "state": value.state_dict(), "training": value.training,
                "frozen": frozen, "known_tasks": sorted(getattr(value, "known_train_tasks_labels", ()))}
    if isinstance(value, ParamData):
        return {KIND: "param", "name": value.name, "data": value.data}
    if isinstance(value, LearningWithoutForgetting):
        return {KIND: "lwf", "prev_model": export_state(value.prev_model, model), "expcount": value.expcount,
                "prev_classes_by_task": {k: sorted(v) for k, v in value.prev_classes_by_task.items()}}
    if isinstance(value, dict):
        return {KIND: "defaultdict" if isinstance(value, defaultdict) else "dict",
                "items": [[k, export_state(v, model)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return [export_state(v, model) for v in value]
    if value is None or isinstance(value, (torch.Tensor, bool, int, float, str)):
        return value
    raise TypeError(f"checkpoint: cannot save a {type(value).__name__} as plain state")


def import_state(saved: Any, model: torch.nn.Module, current: Any = None) -> Any:
    """The inverse of `export_state`; `current` (the plugin's attribute now) gives the container
    type for LwF's helper."""
    if isinstance(saved, list):
        return [import_state(v, model) for v in saved]
    if not isinstance(saved, dict) or KIND not in saved:
        return saved
    kind = saved[KIND]
    if kind == "module":
        templates = {"encoder": lambda: copy.deepcopy(model.encoder), "model": lambda: copy.deepcopy(model),
                     "image_tower": lambda: model.encoder.image_tower_copy()}
        module = templates[saved["template"]]()
        module.load_state_dict(saved["state"])
        frozen = set(saved["frozen"])
        for name, p in module.named_parameters():
            p.requires_grad_(name not in frozen)
        if hasattr(module, "known_train_tasks_labels"):  # Avalanche's multi-task bookkeeping, not in state_dict
            module.known_train_tasks_labels = set(saved["known_tasks"])
        return module.train(saved["training"])
    if kind == "param":
        return ParamData(saved["name"], init_tensor=saved["data"], device=saved["data"].device)
    if kind == "lwf":
        lwf = current if isinstance(current, LearningWithoutForgetting) else LearningWithoutForgetting()
        lwf.prev_model = import_state(saved["prev_model"], model)
        lwf.expcount = saved["expcount"]
        lwf.prev_classes_by_task = defaultdict(set, {k: set(v) for k, v in saved["prev_classes_by_task"].items()})
        return lwf
    items = {k: import_state(v, model) for k, v in saved["items"]}
    return defaultdict(dict, items) if kind == "defaultdict" else items


def plugin_states(plugins, model: torch.nn.Module) -> list[dict[str, Any]]:
    return [{a: export_state(getattr(p, a), model) for a in getattr(p, "checkpoint_attrs", ())} for p in plugins]


def restore_plugins(plugins, states: list[dict[str, Any]], model: torch.nn.Module) -> None:
    for plugin, attrs in zip(plugins, states):
        for name, saved in attrs.items():
            setattr(plugin, name, import_state(saved, model, getattr(plugin, name, None)))
