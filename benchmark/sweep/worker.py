"""What one sweep run does on a worker: the body of the Ray task, written to be idempotent.

`execute_run(spec)` may run any number of times for the same run -- a retry after an exception,
after its worker was killed (kill -9, out of memory, a node lost), or a second invocation of the
whole sweep -- and always moves the run folder forward:

- progress.json says finished: nothing to do (`skipped`);
- checkpoints/state.pt exists: `run_strategy(..., resume=True)` with the folder's own config.yaml
  (only the machine settings -- threads, device -- follow this attempt), exactly `cfbench run --resume`;
- otherwise (no task finished yet): the folder, if any, holds only what a run writes before its
  first checkpoint; it is cleared (under the run's lock, refusing anything a run does not write)
  and the run starts from the beginning.

Before that the task checks that it can write the sweep folder from this node (it must be on a
file system every worker sees), writes `logs/<run>.json` (attempt, host, pid: how the driver
knows the run started) and sends the run's stdout/stderr to `logs/<run>.log`.
Nothing here imports Ray: the driver wraps this function as a Ray task.
"""
from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from ..config import MACHINE_SETTINGS, load_run_config, resolve
from ..config.validate import check_writable_folder
from ..errors import CfbenchError
from ..files import atomic_write_json, open_append
from ..records import read_progress
from ..report.run_folder import PROGRESS, next_step

LOGS = "logs"


def check_output_folder(folder: Path) -> None:
    """The sweep folder is writable from this process: the cheap checks, then a probe file."""

    check_writable_folder(folder, "sweep folder")
    probe = folder / f".probe-{socket.gethostname()}-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise CfbenchError(f"sweep folder {folder} is not writable from {socket.gethostname()} ({err.strerror}); "
                           "it must be on a file system every Ray worker can write") from None


@contextlib.contextmanager
def _output_to(path: Path, header: str) -> Iterator[None]:
    """This task's stdout and stderr (progress lines, warnings) appended to the run's worker log."""
    with open_append(path, "worker log", buffering=1) as fh:
        fh.write(header + "\n")
        with contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
            try:
                yield
            except BaseException as err:
                print(f"attempt ended: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
                      file=fh)
                raise


@contextlib.contextmanager
def _environment(spec: dict) -> Iterator[None]:
    """The driver's working directory (relative paths in configs mean what they meant there) and
    its CFBENCH_* variables, for this task only."""
    old_cwd, old_env = os.getcwd(), {k: os.environ.get(k) for k in spec.get("env", {})}
    os.environ.update(spec.get("env", {}))
    if spec.get("cwd") and os.path.isdir(spec["cwd"]):
        os.chdir(spec["cwd"])
    try:
        yield
    finally:
        os.chdir(old_cwd)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def execute_run(spec: dict) -> dict:
    """One attempt at one run (see the module docstring). spec: name, sweep_dir, config (the
    complete RunConfig mapping), attempt, cwd, env. Returns {"status": done|skipped, "resumed_after"}."""
    with _environment(spec):
        sweep_dir = Path(spec["sweep_dir"])
        run_dir = sweep_dir / spec["name"]
        check_output_folder(sweep_dir)
        host, pid = socket.gethostname(), os.getpid()
        atomic_write_json(sweep_dir / LOGS / f"{spec['name']}.json",
                          {"attempt": spec["attempt"], "host": host, "pid": pid, "started": time.time()})
        header = f"=== attempt {spec['attempt']} on {host}, pid {pid}, {time.strftime('%Y-%m-%d %H:%M:%S')} ==="
        with _output_to(sweep_dir / LOGS / f"{spec['name']}.log", header):
            return _attempt(spec, run_dir)


def _attempt(spec: dict, run_dir: Path) -> dict:
    step = next_step(run_dir)
    if step == "finished":
        print(f"{run_dir}: already finished")
        return {"status": "skipped", "resumed_after": None}
    machine = {k: spec["config"][k] for k in MACHINE_SETTINGS}
    nproc = int(spec.get("nproc", 1))
    if step == "resume":
        cfg = load_run_config(run_dir / "config.yaml", machine)
        done = len(read_progress(run_dir / PROGRESS).get("completed_tasks") or [])
        print(f"resuming {run_dir} after {done} task(s)")
        _train(cfg, run_dir, True, nproc)
        return {"status": "done", "resumed_after": done}
    cfg = resolve(spec["config"])
    print(f"starting {run_dir}")
    _train(cfg, run_dir, False, nproc)
    sys.stdout.flush()
    return {"status": "done", "resumed_after": None}


def _train(cfg, run_dir: Path, resume: bool, nproc: int) -> None:
    """In this process, or (nproc > 1: the task holds that many GPUs) as nproc DDP ranks started by
    torch's elastic launcher on this node: one process per GPU, the CUDA_VISIBLE_DEVICES Ray gave the
    task inherited by the ranks. A local launch rather than Ray Train's TorchTrainer: the run stays
    one Ray task of the sweep (its retries, logs and resume unchanged) and trains as `cfbench run
    --nproc` does."""
    from ..run.launch import launch_local
    from ..run.runner import run_strategy

    if nproc <= 1:
        run_strategy(cfg, cfg.strategies[0], run_dir, resume=resume)
        return
    logs = run_dir.parent / LOGS
    job = logs / f"{run_dir.name}.ranks.json"
    atomic_write_json(job, {"config": cfg.to_dict(), "run_dir": str(run_dir), "resume": resume})
    print(f"training over {nproc} processes (DDP); each rank's output in {logs / (run_dir.name + '.ranks')}")
    launch_local(nproc, ["-m", "benchmark.sweep.ranks", str(job)], logs / f"{run_dir.name}.ranks")
