"""checkpoints/state.pt: what --resume continues from. It pins its experiment: it carries the
settings the run started with, and a config.yaml that no longer matches them is refused, naming the
first setting that differs. A state.pt may come from someone else, so it is loaded as tensors and
plain types only, and every field is checked (type, range, shape) before any is used."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from strategies.checkpoint import plugin_states, restore_plugins
from tasks import get_task

from ..config import experiment_digest, experiment_settings, first_difference, lookup
from ..errors import CfbenchError, ResumeRefused
from ..evaluation.matrix import PRETRAINED, Matrix
from ..evaluation.within import PREFIX, Curve
from ..files import atomic_write_with
from ..report.run_folder import CHECKPOINT, FINAL_WEIGHTS, write_progress

FIELDS = ("completed", "experiment", "model", "known_tasks", "matrices", "plugins")


def save_checkpoint(run_dir: Path, settings: dict, model, plugins, matrices: dict[str, Matrix],
                    completed: int, curves: Optional[dict[str, Curve]] = None,
                    next_head: Optional[dict[str, torch.Tensor]] = None) -> None:
    """state.pt, then the matrices, the within-task curves and progress.json (each written atomically).
    next_head: the next task's LP-init head, fitted from the round just evaluated."""
    state = {"completed": completed, "experiment": experiment_settings(settings), "model": model.state_dict(),
             "known_tasks": sorted(model.known_train_tasks_labels),  # Avalanche's, outside the state dict
             "matrices": {k: (m.rows, m.columns, m.values) for k, m in matrices.items()},
             "plugins": plugin_states(plugins, model),
             "within": {k: c.to_state() for k, c in (curves or {}).items()},
             "next_head": next_head}
    atomic_write_with(run_dir / CHECKPOINT, lambda fh: torch.save(state, fh))
    for kind, m in matrices.items():
        m.save(run_dir / "matrices" / f"{kind}.csv")
    for kind, c in (curves or {}).items():
        c.save(run_dir / "matrices" / f"{PREFIX}{kind}.csv")
    write_progress(run_dir, matrices["lp"].rows[1:], False, experiment_digest(settings))


def keep_finished_checkpoint(run_dir: Path, policy: str, model) -> None:
    """`checkpoints` of a finished run: keep state.pt, keep the final weights alone (model.pt), or
    drop both. The run is already marked finished: nothing resumes from here."""
    if policy == "keep":
        return
    if policy == "last":
        atomic_write_with(run_dir / FINAL_WEIGHTS, lambda fh: torch.save(model.state_dict(), fh))
    (run_dir / CHECKPOINT).unlink(missing_ok=True)
    if policy == "drop":
        (run_dir / FINAL_WEIGHTS).unlink(missing_ok=True)
        folder = (run_dir / CHECKPOINT).parent
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def load_checkpoint(run_dir: Path, settings: dict, trained: Sequence[str], columns: Sequence[str],
                    kinds: Sequence[str], device: str) -> dict:
    """state.pt checked against the run's config (`settings`, as config.yaml holds them): the same
    experiment, a task count within the sequence, matrices of this run's rows and columns."""
    path = run_dir / CHECKPOINT
    try:  # tensors and plain types only: a foreign run folder cannot execute code here
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # unpickling raises many types for corrupt, truncated or crafted files
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CfbenchError(f"{path}: not a loadable cfbench checkpoint ({reason[:200]}); nothing was resumed") from None

    def bad(field: str, why: str) -> CfbenchError:
        return CfbenchError(f"{path}: field {field!r} {why}; not a checkpoint of this run, nothing was resumed")

    if not isinstance(state, dict):
        raise bad("(top level)", "is not a mapping")
    for field in FIELDS:
        if field not in state:
            raise bad(field, "is missing (a checkpoint of another cfbench version?)")
    pinned = state["experiment"]
    if not isinstance(pinned, dict):
        raise bad("experiment", "is not a mapping of settings")
    key = first_difference(pinned, experiment_settings(settings))
    if key:
        raise CfbenchError(f"{run_dir / 'config.yaml'}: {key} is not what this run was started with (the "
                           f"checkpoint's {lookup(pinned, key)!r}, now {lookup(settings, key)!r}); a run continues "
                           "only with its own settings: restore config.yaml or start a new run")
    done = state["completed"]
    if type(done) is not int or not 1 <= done <= len(trained):
        raise bad("completed", f"must be a whole number of tasks from 1 to {len(trained)}, not {done!r}"[:200])
    if not isinstance(state["model"], dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                       for k, v in state["model"].items()):
        raise bad("model", "is not a mapping of parameter names to tensors")
    known = state["known_tasks"]
    if not isinstance(known, list) or not all(type(t) is int and 0 <= t < done for t in known):
        raise bad("known_tasks", f"must list task numbers below {done}")
    _check_matrices(state["matrices"], [PRETRAINED, *trained[:done]], list(columns), set(kinds), bad)
    if not isinstance(state["plugins"], list):
        raise bad("plugins", "is not a list of plugin states")
    _check_next_head(state.get("next_head"), trained[done] if done < len(trained) else None, bad)
    return state


def _check_next_head(saved: Any, task: Optional[str], bad) -> None:
    """None (not LP-init, the last task, or an older checkpoint), or the next task's head: finite
    float weight (classes x features) and bias (classes)."""
    if saved is None:
        return
    classes = get_task(task).num_classes if task is not None else None
    if not (isinstance(saved, dict) and set(saved) == {"weight", "bias"}):
        raise bad("next_head", "is not a mapping of an LP-init head's weight and bias")
    weight, bias = saved["weight"], saved["bias"]
    if not (isinstance(weight, torch.Tensor) and isinstance(bias, torch.Tensor)
            and weight.is_floating_point() and bias.is_floating_point() and weight.dim() == 2
            and weight.shape[0] == classes and bias.shape == (classes,)
            and bool(torch.isfinite(weight).all()) and bool(torch.isfinite(bias).all())):
        raise bad("next_head", f"is not an LP-init head of {task}'s {classes} classes")


def _check_matrices(saved: Any, rows: list[str], columns: list[str], kinds: set, bad) -> None:
    if not isinstance(saved, dict) or set(saved) != kinds:
        raise bad("matrices", f"must hold the matrices {sorted(kinds)}")
    for kind, entry in saved.items():
        if not (isinstance(entry, (list, tuple)) and len(entry) == 3):
            raise bad(f"matrices.{kind}", "is not (rows, columns, values)")
        got_rows, got_cols, values = entry
        if list(got_rows) != rows or list(got_cols) != columns:
            raise bad(f"matrices.{kind}", f"has rows / columns other than this run's {rows} / {columns}")
        if not (isinstance(values, list) and len(values) == len(rows)
                and all(isinstance(r, list) and len(r) == len(columns) for r in values)
                and all(isinstance(v, float) and (math.isnan(v) or 0 <= v <= 100) for r in values for v in r)):
            raise bad(f"matrices.{kind}", "values are not a rows x columns table of accuracies")


def apply_checkpoint(state: dict, model, plugins, matrices: dict[str, Matrix],
                     curves: Optional[dict[str, Curve]] = None) -> int:
    """The checked state into the model, plugins, matrices and curves (`_apply`); what does not fit
    is ResumeRefused: the run folder is then left as it was."""
    try:
        return _apply(state, model, plugins, matrices, curves)
    except CfbenchError as err:
        raise ResumeRefused(str(err)) from None


def _apply(state: dict, model, plugins, matrices: dict[str, Matrix],
           curves: Optional[dict[str, Curve]] = None) -> int:
    """The checked state into the model (its heads already made), the plugins, the matrices and the
    within-task curves (replaced in `curves`); returns how many tasks are done."""
    path = CHECKPOINT
    expected = model.state_dict()
    weights = state["model"]
    if set(weights) != set(expected):
        odd = sorted(set(weights) ^ set(expected))
        raise CfbenchError(f"{path}: the model weights name other parameters than this run's model ({odd[0]!r}, "
                           f"{len(odd)} in all); nothing was resumed")
    for name, tensor in weights.items():
        if tensor.shape != expected[name].shape:
            raise CfbenchError(f"{path}: weight {name!r} has shape {tuple(tensor.shape)}, this run's model "
                               f"{tuple(expected[name].shape)}; nothing was resumed")
    model.load_state_dict(weights)
    head = state.get("next_head")
    if head is not None and head["weight"].shape[1] != model.encoder.feature_dim:
        raise CfbenchError(f"{path}: the next task's LP-init head reads {head['weight'].shape[1]} features, this "
                           f"run's encoder gives {model.encoder.feature_dim}; nothing was resumed")
    model.known_train_tasks_labels = set(state["known_tasks"])
    for k, (rows, cols, values) in state["matrices"].items():
        matrices[k] = Matrix(list(rows), list(cols), [list(r) for r in values])
    curves = {} if curves is None else curves
    saved = state.get("within", {})
    if not isinstance(saved, dict) or set(saved) != set(curves):
        raise CfbenchError(f"{path}: holds within-task curves {sorted(saved) if isinstance(saved, dict) else '?'}, "
                           f"this run evaluates {sorted(curves)}; nothing was resumed")
    done = [name for name in matrices["lp"].rows[1:]]
    for kind in curves:
        curves[kind] = Curve.from_state(saved[kind], curves[kind].columns, done, f"{path}: within.{kind}")
    try:
        restore_plugins(plugins, state["plugins"], model)
    except Exception as err:  # a crafted plugin state can fail in any of the plugins' own types
        raise CfbenchError(f"{path}: the strategy's saved state does not fit it ({type(err).__name__}: "
                           f"{str(err)[:200]}); nothing was resumed") from None
    for plugin in plugins:  # each plugin's own rules for what it restored (iCaRL: its memory's positions)
        problem = plugin.check_restored(state["completed"]) if hasattr(plugin, "check_restored") else None
        if problem:
            raise CfbenchError(f"{path}: field 'plugins': {problem}; nothing was resumed")
    return state["completed"]
