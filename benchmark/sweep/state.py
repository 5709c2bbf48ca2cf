"""What a sweep finds and keeps in its folder: each run folder's status, whether a started run
still matches the sweep file, the driver's lock on the sweep folder, and sweep.json (per run its
state, attempts and last error line), which only the driver writes, atomically."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import strategies

from ..config import MACHINE_SETTINGS, lookup
from ..errors import CfbenchError
from ..files import atomic_write_json, read_yaml_mapping, refuse_links
from ..records import progress_of, read_sweep_state
from ..report.run_folder import CHECKPOINT, exclusive_lock
from .config import SweepPlan

SWEEP_STATE = "sweep.json"


@dataclass
class FolderStatus:
    exists: bool = False
    finished: bool = False
    checkpoint: bool = False
    completed: int = 0

    def describe(self, total: int) -> str:
        if self.finished:
            return "done"
        if self.checkpoint:
            return f"resume after {self.completed}/{total}"
        return "restart" if self.exists else "new"


def folder_status(run_dir: Path) -> FolderStatus:
    if not run_dir.is_dir():
        return FolderStatus()
    progress = progress_of(run_dir)
    return FolderStatus(True, bool(progress.get("finished")), (run_dir / CHECKPOINT).is_file(),
                        len(progress.get("completed_tasks") or []))


def config_difference(planned: dict, actual: dict) -> Optional[str]:
    """The first experiment setting in which a run folder's config.yaml differs from the planned
    config, or None. Machine settings may differ; what run_strategy fills in (image size, the
    sequence's tasks, strategy defaults, cache format) is compared only where the plan sets it."""

    skip = {*MACHINE_SETTINGS, "out"}
    expected = dict(planned)
    combo = planned["strategies"][0]
    expected["strategy_params"] = {**planned["strategy_params"],
                                   **strategies.resolve_params(combo, planned["strategy_params"])}
    for key in ("tasks", "eval_only"):
        if planned[key] is None:
            skip.add(key)
    if planned["cache_format"] == "auto":
        skip.add("cache_format")

    def first(a, b, where: str) -> Optional[str]:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in a:
                if where == "model." and k == "image_size" and a[k] is None:
                    continue
                found = first(a[k], b.get(k), f"{where}{k}.") if k in b else f"{where}{k}"
                if found:
                    return found
            return None
        return None if a == b else where.rstrip(".")

    for key, value in expected.items():
        if key in skip:
            continue
        found = first(value, actual.get(key), f"{key}.") if key in actual else key
        if found:
            return found
    return None


def check_unchanged(plan: SweepPlan) -> None:
    """A run folder started by an earlier invocation must hold the run the sweep file describes now."""

    for run in plan.runs:
        cfg_file = plan.folder / run.name / "config.yaml"
        if not cfg_file.is_file():
            continue
        planned = run.config.to_dict()
        actual = read_yaml_mapping(cfg_file, "config.yaml")
        key = config_difference(planned, actual)
        if key:
            raise CfbenchError(f"{plan.folder / run.name}: was started with other settings ({key}: "
                               f"{lookup(actual, key)!r} there, {lookup(planned, key)!r} in {plan.path}); give "
                               "the sweep another name, or move that folder away")


@contextlib.contextmanager
def hold_sweep_folder(folder: Path) -> Iterator[None]:
    """The sweep folder for this driver alone (an advisory lock released when it exits)."""

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CfbenchError(f"{folder}: cannot create the sweep folder ({err.strerror})") from None
    with exclusive_lock(folder, "cfbench sweep"):
        refuse_links(folder, "sweep folder")
        yield


class SweepState:
    """sweep.json: per run its state (queued, running, done, failed), attempts (over every
    invocation), last error line, where its current attempt runs and its finished tasks.
    Written atomically by the driver only."""

    def __init__(self, plan: SweepPlan, statuses: dict[str, FolderStatus]):

        self.path = plan.folder / SWEEP_STATE
        old = read_sweep_state(self.path) if self.path.is_file() or self.path.is_symlink() else {}
        old_runs = old.get("runs", {})
        self.data: dict = {"sweep": plan.name, "file": str(plan.path.absolute()), "ray": None, "resources": None,
                           "updated": None, "runs": {}}
        for run in plan.runs:
            prev = old_runs.get(run.name, {})
            status = statuses[run.name]
            attempts = prev.get("attempts", 0)
            self.data["runs"][run.name] = {
                "state": "done" if status.finished else "queued", "attempts": attempts,
                "error": None if status.finished else prev.get("error"),
                "strategy": run.strategy, "seed": run.seed, "axes": run.axes, "tasks": len(run.tasks),
                "completed_tasks": status.completed, "host": prev.get("host"), "pid": prev.get("pid")}

    @property
    def runs(self) -> dict[str, dict]:
        return self.data["runs"]

    def set(self, name: str, **fields) -> None:
        self.runs[name].update(fields)
        self.save()

    def save(self) -> None:
        self.data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        atomic_write_json(self.path, self.data)
