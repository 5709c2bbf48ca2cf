"""Run folders: created exclusively, held by one process at a time (an advisory lock the kernel
releases when the process dies, even by kill -9), with progress.json from the first moment."""
from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import shutil
import stat
import time
from pathlib import Path
from typing import Iterator

from ..errors import CfbenchError, ResumeRefused
from ..files import atomic_write_json, open_no_follow, refuse_links
from ..records import progress_of, read_progress

PROGRESS = "progress.json"
DEVIATIONS = "deviations.json"  # how the run differs from its protocol (config/deviations.py)
LOCK = ".lock"
CHECKPOINT = "checkpoints/state.pt"  # run/checkpoint.py
FINAL_WEIGHTS = "checkpoints/model.pt"  # a finished run's weights alone (checkpoints: last)
# everything a run folder can hold (cfbench run's own files and the trackers'); a folder with
# anything else is never cleared
RUN_ENTRIES = {"config.yaml", PROGRESS, DEVIATIONS, "log.txt", LOCK, "matrices", "checkpoints",
               "metrics.json", "tensorboard", "mlruns", "wandb", "tracker.csv"}
RUN_PREFIXES = ("heatmap_", "curves_", "within_")


def runs_of(folders: list[Path]) -> list[Path]:
    """The run folders named, each once: a folder that is no run folder itself but holds run
    folders (the invocation folder `cfbench run` prints as `results:`) stands for the runs inside it."""
    runs = []
    for folder in folders:
        if folder.is_dir() and not folder.is_symlink() and not (folder / "config.yaml").exists():
            inside = sorted(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink()
                            and (p / "config.yaml").is_file() and (p / PROGRESS).is_file())
            if inside:
                runs.extend(inside)
                continue
        runs.append(folder)
    unique: dict[Path, Path] = {}
    for run in runs:  # a folder named twice (or by two paths) is one run, not two seeds
        unique.setdefault(run.resolve(), run)
    return list(unique.values())


def new_invocation_folder(out: Path, label: str) -> Path:
    """out/<timestamp>-<label>, or with -2, -3, ... when another invocation took that name in the
    same second: mkdir is atomic, so two processes never share one folder."""
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{label}"
    for n in range(1, 1000):
        path = out / (stem if n == 1 else f"{stem}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise CfbenchError(f"{out}: could not create a new folder named {stem}-N")


@contextlib.contextmanager
def exclusive_lock(folder: Path, holder: str) -> Iterator[None]:
    """folder/.lock held by this process (its pid inside) for the block; a second holder is refused
    in one line naming the first one's pid. A .lock that is a symbolic link is refused before
    anything is written (it could name any file of the user's)."""
    fd = open_no_follow(folder / LOCK, os.O_RDWR | os.O_CREAT, "lock file")
    with os.fdopen(fd, "r+") as lock:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CfbenchError(f"{folder / LOCK}: the lock file is not a regular file; remove it")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CfbenchError(f"{folder}: in use by another {holder} (pid {lock.read(32).strip() or '?'}); wait "
                               "for it to finish or stop it first") from None
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        yield


def next_step(run_dir: Path) -> str:
    """What a run folder left by an earlier attempt (a sweep's retry, torchrun's elastic restart)
    asks of the next: "finished" (leave it), "resume" (from its checkpoint) or "start" -- a
    folder without a checkpoint holds only what a run writes before it, and is cleared first."""
    if progress_of(run_dir).get("finished"):
        return "finished"
    if (run_dir / CHECKPOINT).is_file():
        return "resume"
    clear_unstarted(run_dir)
    return "start"


def clear_unstarted(run_dir: Path) -> None:
    """Empty a run folder that holds no checkpoint, so that the run can start again; refuses a
    folder another process holds or that holds files no run writes."""
    if not run_dir.exists():
        return
    with exclusive_lock(run_dir, "cfbench process"):
        foreign = sorted(p.name for p in run_dir.iterdir()
                         if p.name not in RUN_ENTRIES and not p.name.startswith(RUN_PREFIXES)
                         and not (p.name.startswith(".") and p.name.endswith(".tmp")))
        if foreign:
            raise CfbenchError(f"{run_dir}: holds files a run does not write ({', '.join(foreign[:3])}); it is not "
                               "cleared; move them away")
        for entry in run_dir.iterdir():
            if entry.name == LOCK:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        (run_dir / LOCK).unlink()  # last, while still held: the folder is empty for run_strategy


@contextlib.contextmanager
def hold_run_folder(run_dir: Path, resume: bool, experiment: str) -> Iterator[None]:
    """The run folder for this process alone while the block runs. A fresh run needs a new or
    empty folder and starts progress.json at once, with the `experiment` digest of its settings; a
    resumed one must hold a folder of that same digest and no symbolic link. Any error is recorded
    in progress.json, but ResumeRefused (the checkpoint does not fit): it leaves the folder as it
    was. A resumed run calls `clear_error` once its checkpoint is applied."""
    if not resume:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CfbenchError(f"{run_dir}: cannot create the run folder ({err.strerror})") from None
        if any(run_dir.iterdir()):
            raise CfbenchError(f"{run_dir}: already holds a run; continue it with --resume {shlex.quote(str(run_dir))} "
                               "or choose another folder")
    lock_existed = (run_dir / LOCK).exists()
    with exclusive_lock(run_dir, "cfbench process"):
        refuse_links(run_dir, "run folder")
        if resume:
            _check_experiment(run_dir, experiment)
        for tmp in run_dir.rglob(".*.tmp"):  # atomic writes of a killed holder; the lock says none is live
            tmp.unlink(missing_ok=True)
        if not resume:
            write_progress(run_dir, [], False, experiment)
        try:
            yield
        except ResumeRefused:  # the checkpoint did not fit: the folder stays as it was
            if not lock_existed:
                (run_dir / LOCK).unlink()
            raise
        except BaseException as err:
            _record_error(run_dir, err)
            raise
        if read_progress(run_dir / PROGRESS).get("finished"):
            (run_dir / LOCK).unlink()  # a finished folder is shared as it is; unlinked while still held


def write_progress(run_dir: Path, completed_tasks: list[str], finished: bool, experiment: str) -> None:
    """progress.json: the finished tasks, whether everything is written, the settings digest."""
    atomic_write_json(run_dir / PROGRESS, {"completed_tasks": completed_tasks, "finished": finished,
                                           "experiment": experiment})


def _check_experiment(run_dir: Path, experiment: str) -> None:
    found = read_progress(run_dir / PROGRESS).get("experiment")
    if found is None:
        raise CfbenchError(f"{run_dir / PROGRESS}: records no settings digest (a run of an older cfbench?), so it "
                           "cannot be shown to be this config's run; start the run again")
    if found != experiment:
        raise CfbenchError(f"{run_dir}: config.yaml no longer matches the experiment this run started (progress.json "
                           f"records settings digest {str(found)[:20]!r}, config.yaml gives {experiment!r}); restore "
                           "config.yaml or start a new run")


def clear_error(run_dir: Path) -> None:
    """A resumed attempt starts clean (called once its checkpoint is applied): the last one's error
    line goes."""
    progress = progress_of(run_dir)
    if "error" in progress:
        atomic_write_json(run_dir / PROGRESS, {k: v for k, v in progress.items() if k != "error"})


def _record_error(run_dir: Path, err: BaseException) -> None:
    """The error line beside the progress, so a sweep or a user sees why a run stopped (unless the
    disk is full: then the line cannot be written, and the error itself says so)."""
    try:
        progress = read_progress(run_dir / PROGRESS)
    except CfbenchError:
        progress = {"completed_tasks": [], "finished": False}
    line = interruption_line(err) or (str(err).splitlines() or [type(err).__name__])[0]
    try:
        atomic_write_json(run_dir / PROGRESS, {**progress, "finished": False, "error": line})
    except CfbenchError:
        pass


def interruption_line(err: BaseException) -> str:
    """'interrupted (SIGTERM)' and the like for an interruption, else ''."""
    if isinstance(err, KeyboardInterrupt):
        return f"interrupted ({getattr(err, 'signal_name', 'SIGINT')})"
    return ""
