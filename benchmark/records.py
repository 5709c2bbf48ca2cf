"""One typed reader per kind of file cfbench reads back from a folder it did not necessarily write:
a run's progress.json, metrics.json, deviations.json and config.yaml (as the reports read it), a
sweep's sweep.json and rank-job files, the reaper's records. Matrices and curves have theirs in
evaluation/ (Matrix.from_csv_text, Curve), checkpoints in run/checkpoint.py.

A file of the wrong type or shape is one line naming the file and the key, never a traceback later
on, far from the file that caused it. Shapes are written as data:

    bool, int, str          that type (bool is not an int here, nor an int a bool)
    NUMBER                  an int or a float, never a bool
    [shape]                 a list of shape
    {"key": shape, ...}     a mapping with exactly these keys; "key?" marks one that may be absent
    MapOf(key, shape)       a mapping of any keys matching regex `key` to shape
    Maybe(shape)            shape or null
    OneOf("a", "b")         one of these strings
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CfbenchError
from .files import read_json, read_yaml_mapping

NUMBER = "number"
NAME = r"[^\x00-\x1f]{1,200}"  # a task, metric or run name: printable, not empty, not a path's length
PID = r"[1-9][0-9]{0,6}"  # Linux pids are at most 2**22 (pid_max)
PID_MAX = 2 ** 22
NOT_OURS = "not a file cfbench wrote (edited by hand, or another version's?)"


@dataclass(frozen=True)
class MapOf:
    key: str
    value: Any


@dataclass(frozen=True)
class Maybe:
    shape: Any


@dataclass(frozen=True)
class OneOf:
    values: tuple

    def __init__(self, *values: str):
        object.__setattr__(self, "values", values)


def describe(shape: Any) -> str:
    if shape is bool:
        return "true or false"
    if shape is int:
        return "a whole number"
    if shape is str:
        return "a string"
    if shape == NUMBER:
        return "a number"
    if isinstance(shape, list):
        return f"a list of {describe(shape[0]).removeprefix('a ').removeprefix('an ')}s"
    if isinstance(shape, (dict, MapOf)):
        return "a mapping"
    if isinstance(shape, Maybe):
        return f"{describe(shape.shape)} or null"
    if isinstance(shape, OneOf):
        return " or ".join(repr(v) for v in shape.values)
    raise TypeError(shape)


def check_shape(value: Any, shape: Any, source: str, key: str = "") -> None:
    """Raise CfbenchError naming `source` and the dotted `key` where `value` departs from `shape`."""
    def bad(why: str = "") -> CfbenchError:
        where = f"key {key!r}" if key else "the top level"
        found = repr(value)
        found = found if len(found) <= 60 else found[:57] + "..."
        return CfbenchError(f"{source}: {where} must be {why or describe(shape)}, not {found}; {NOT_OURS}")

    if shape is Any:
        return
    if isinstance(shape, Maybe):
        if value is not None:
            check_shape(value, shape.shape, source, key)
        return
    if shape is bool or shape is str:
        if not isinstance(value, shape):
            raise bad()
    elif shape is int:
        if type(value) is not int:
            raise bad()
    elif shape == NUMBER:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
    elif isinstance(shape, OneOf):
        if value not in shape.values:
            raise bad()
    elif isinstance(shape, list):
        if not isinstance(value, list):
            raise bad()
        for i, item in enumerate(value):
            check_shape(item, shape[0], source, f"{key}[{i}]")
    elif isinstance(shape, MapOf):
        if not isinstance(value, dict):
            raise bad()
        for k, item in value.items():
            if not isinstance(k, str) or not re.fullmatch(shape.key, k):
                raise bad(f"a mapping whose keys are {_key_words(shape.key)} (found {str(k)[:40]!r})")
            check_shape(item, shape.value, source, f"{key}.{k}" if key else k)
    elif isinstance(shape, dict):
        if not isinstance(value, dict):
            raise bad()
        wanted = {k.rstrip("?"): k.endswith("?") for k in shape}
        for k in value:
            if k not in wanted:
                raise CfbenchError(f"{source}: unknown key {'.'.join(filter(None, [key, str(k)]))!r}; {NOT_OURS}")
        for k, optional in wanted.items():
            if k not in value:
                if optional:
                    continue
                raise CfbenchError(f"{source}: key {'.'.join(filter(None, [key, k]))!r} is missing; {NOT_OURS}")
            check_shape(value[k], shape[k + "?" if optional else k], source, f"{key}.{k}" if key else k)
    else:
        raise TypeError(shape)


def _key_words(pattern: str) -> str:
    return {PID: "process ids", NAME: "names"}.get(pattern, f"matching {pattern}")


# ---- run folders -------------------------------------------------------------------------

PROGRESS_SHAPE = {"completed_tasks": [str], "finished": bool, "experiment?": str, "error?": str}
# metrics.json: per kind (lp, zs, head, lp_ece, ...) metric name -> number or null; notes
METRICS_SHAPE = MapOf(NAME, MapOf(NAME, Maybe(NUMBER)))
DEVIATIONS_SHAPE = [{"key": str, "protocol": Any, "run": Any}]  # config/deviations.py Deviation.to_dict
# what the reports read of a run's config.yaml (the run itself reads it through config/schema.py)
RUN_CONFIG_FOR_REPORTS = {"strategies": [str], "protocol?": Maybe(str), "sequence?": Maybe(str),
                          "tasks?": Maybe([str]), "eval_only?": Maybe([str]), "seed?": int, "figures?": bool,
                          "model?": {"name": str}, "train?": {"epochs?": Any}}


def read_checked(path: Path, what: str, shape: Any) -> Any:
    """The JSON file at `path` (a `what`: the strict reader's one line names it), refused in one
    line naming the file and the key unless it has `shape`."""
    data = read_json(path, what)
    check_shape(data, shape, str(path))
    return data


def read_progress(path: Path) -> dict:
    """progress.json: the finished tasks, whether everything is written, the settings digest, the
    last error line."""
    return read_checked(path, "progress file", PROGRESS_SHAPE)


def progress_of(run_dir: Path) -> dict:
    """A run folder's progress.json (read_progress), or {} where there is none yet."""
    path = Path(run_dir) / "progress.json"
    return read_progress(path) if path.is_file() or path.is_symlink() else {}


def read_metrics(path: Path) -> dict:
    """metrics.json: {kind: {metric: number or null}}, and "notes": [lines]."""
    data = read_json(path, "metrics file")
    if isinstance(data, dict) and "notes" in data:
        check_shape(data["notes"], [str], str(path), "notes")
        check_shape({k: v for k, v in data.items() if k != "notes"}, METRICS_SHAPE, str(path))
    else:
        check_shape(data, METRICS_SHAPE, str(path))
    return data


def read_deviations(path: Path) -> list:
    """deviations.json: a list of changes from the run's protocol."""
    return read_checked(path, "deviations file", DEVIATIONS_SHAPE)


def read_run_config_for_reports(path: Path) -> dict:
    """A run's config.yaml as compare, plot and the figures read it: the keys they use, typed
    (one strategy combination at least); every other key is left to the run's own schema."""
    data = read_yaml_mapping(path, "config.yaml (not a cfbench run folder)")
    used = {k: v for k, v in data.items() if k.rstrip("?") in {s.rstrip("?") for s in RUN_CONFIG_FOR_REPORTS}}
    if "model" in used and isinstance(used["model"], dict):
        used["model"] = {k: v for k, v in used["model"].items() if k == "name"}
    if "train" in used and isinstance(used["train"], dict):
        used["train"] = {k: v for k, v in used["train"].items() if k == "epochs"}
    check_shape(used, RUN_CONFIG_FOR_REPORTS, str(path))
    if not data["strategies"]:
        raise CfbenchError(f"{path}: names no strategy; not a cfbench run config")
    return data


# ---- sweeps ------------------------------------------------------------------------------

RUN_STATE_SHAPE = {"state": OneOf("queued", "running", "done", "failed"), "attempts": int, "error": Maybe(str),
                   "strategy": str, "seed": int, "axes": MapOf(NAME, Any), "tasks": int,
                   "completed_tasks": int, "host": Maybe(str), "pid": Maybe(int)}
SWEEP_STATE_SHAPE = {"sweep": str, "file": str, "ray": Maybe(str), "resources": Any, "updated": Maybe(str),
                     "runs": MapOf(NAME, RUN_STATE_SHAPE), "submitted_this_invocation?": int}
# logs/<run>.json: the attempt a worker started, where (sweep/worker.py)
RUN_MARKER_SHAPE = {"attempt": int, "host": str, "pid": int, "started": NUMBER}
# the job file of a run trained over several ranks inside a Ray task (sweep/ranks.py)
RANK_JOB_SHAPE = {"config": MapOf(NAME, Any), "run_dir": str, "resume": bool}
# sweep/reaper.py: the driver, its start time, its cluster's token, {pid: start time}
REAPER_RECORD_SHAPE = {"driver": int, "driver_started": NUMBER, "token": str, "processes": MapOf(PID, NUMBER)}


def read_sweep_state(path: Path) -> dict:
    """sweep.json: per run its state, attempts, last error line, host and pid, finished tasks."""
    return read_checked(path, "sweep state", SWEEP_STATE_SHAPE)


def read_run_marker(path: Path) -> dict:
    """logs/<run>.json: which attempt of a sweep's run a worker started, on which host and pid."""
    return read_checked(path, "run marker", RUN_MARKER_SHAPE)


def marker_of(path: Path) -> dict:
    """read_run_marker, or {} while the worker has not written it."""
    return read_run_marker(path) if path.is_file() or path.is_symlink() else {}


def read_rank_job(path: Path) -> dict:
    return read_checked(path, "sweep rank job", RANK_JOB_SHAPE)


def read_reaper_record(path: Path) -> dict:
    """.ray-processes-<pid>.json: which processes a sweep driver's cluster started (they must still
    prove it by the token in their environment before the reaper ends them, sweep/reaper.py)."""
    data = read_checked(path, "reaper record", REAPER_RECORD_SHAPE)
    if not 0 < data["driver"] <= PID_MAX or any(int(pid) > PID_MAX for pid in data["processes"]):
        raise CfbenchError(f"{path}: process ids must be from 1 to {PID_MAX:,}; {NOT_OURS}")
    if not re.fullmatch(r"[0-9a-f]{32}", data["token"]):
        raise CfbenchError(f"{path}: key 'token' must be 32 hexadecimal digits; {NOT_OURS}")
    return data
