"""`cfbench run --nproc N` (and a sweep run with resources.num_gpus: N): the same work as N
processes on this machine, started by torch's elastic launcher (what `torchrun --standalone
--nproc-per-node N` does), never a home-made one. Also each rank's side of it: joining the process
group, the invocation folder rank 0 fills, and what an elastic restart does with the run folders of
an earlier attempt.

Each rank's output goes to a folder of logs (rank 0's is shown as well). A rank that fails is
recorded by torch's elastic error file and the launcher stops the others; this process then prints
one line naming the rank that failed first -- the one a signal killed, else one with an error --
and what it was.

The launcher's own life bounds the ranks': SIGTERM or Ctrl-C of it stops them and ends in the one
line and exit status of any interrupted run (143, 130), and a rank dies with it even when it is
killed outright (kill -9: PR_SET_PDEATHSIG). `--max-restarts K` starts each attempt as a new elastic
launch with its own rendezvous: torch's in-place restarts reconnect gloo to the first attempt's
addresses and finished 1 try of 3 here ("connectFullMesh failed", one hang; BENCHMARKS.md).
"""
from __future__ import annotations

import ctypes
import json
import os
import shlex
import signal
import stat
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Optional

import strategies

from ..config.schema import ModelConfig
from ..config.validate import check_writable_folder
from ..distributed import World, broadcast, init_from_env, launched
from ..errors import CfbenchError
from ..files import refuse_links
from ..records import progress_of
from ..report.run_folder import CHECKPOINT, PROGRESS, new_invocation_folder, next_step

LAUNCHED_ENV = "CFBENCH_LAUNCHED"      # set in the ranks: they leave the error line to the launcher
INVOCATION_ENV = "CFBENCH_INVOCATION"  # the invocation folder `--nproc` made, for its rank 0 to fill
ATTEMPT_ENV = "CFBENCH_ATTEMPT"        # which attempt of --max-restarts the ranks belong to (0: the first)
LAUNCHER_ENV = "CFBENCH_LAUNCHER_PID"  # the ranks die with this process
PR_SET_PDEATHSIG = 1                   # linux/prctl.h
__all__ = ["after_restart", "broadcast", "check_launch", "invocation_folder", "join_ranks", "launch_ranks",
           "launched", "launch_local", "record_rank_failure", "die_with_launcher"]


def check_launch(nproc: int, device: str, combos: list[str], model: ModelConfig) -> None:
    """Before any process starts: strategies that can train over `nproc` processes, a model without
    BatchNorm that trains, and one GPU per process, as torchrun assigns them (LOCAL_RANK)."""
    import torch

    for combo in combos:
        strategies.check_data_parallel(combo, nproc)
    if nproc > 1 and not model.freeze_bn:  # a model whose BatchNorm trains: built to look (timm, open_clip)
        from ..models.factory import check_batchnorm

        check_batchnorm(model, nproc)
    visible = torch.cuda.device_count()
    if (device == "cuda" or (device == "auto" and visible)) and nproc > visible:
        raise CfbenchError(f"--nproc {nproc} trains one process per GPU but {visible} GPU(s) are visible; use "
                           f"--nproc {visible or 1} or --device cpu (gloo)")


def launch_ranks(nproc: int, argv: list[str], max_restarts: int, invocation: Path) -> int:
    """`--nproc N`: the command line `argv` again as N ranks filling `invocation`, then one line if
    one failed (with the --resume command of a run that has finished tasks)."""
    try:
        launch_local(nproc, ["-m", "benchmark", *rank_argv(argv)], invocation / ".ranks",
                     {INVOCATION_ENV: str(invocation)}, max_restarts)
    except KeyboardInterrupt as err:  # the run it stopped, for the line that says how to continue it
        runs = _unfinished(invocation)
        if runs:
            err.run_dir = runs[0]
        raise
    except CfbenchError as err:
        stopped = [d for d in _unfinished(invocation) if (d / CHECKPOINT).is_file()]
        hint = "".join(f"; finished tasks are checkpointed: continue with cfbench run --nproc {nproc} "
                       f"--resume {shlex.quote(str(d))}" for d in stopped[:1])
        raise CfbenchError(f"{err}{hint} (each rank's output: {invocation / '.ranks'})") from None
    return 0


def _unfinished(invocation: Path) -> list[Path]:
    """The invocation's run folders that have not finished."""
    return sorted(d for d in invocation.iterdir() if d.is_dir() and not d.is_symlink() and (d / PROGRESS).is_file()
                  and not progress_of(d).get("finished"))


def rank_argv(argv: list[str]) -> list[str]:
    """The command line without the launcher's own flags."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item in ("--nproc", "--max-restarts"):
            skip = True
        elif not item.startswith(("--nproc=", "--max-restarts=")):
            out.append(item)
    return out


def join_ranks(device: str) -> World:
    """This process's place among torchrun's ranks (one process: rank 0 of 1)."""
    return init_from_env(device)


def invocation_folder(out: Path, label: str, ranks: World) -> tuple[Path, bool]:
    """(the folder this invocation fills, whether it was given), made by rank 0 and shared: the one
    `--nproc` made; under torchrun the one named by the job's run id, the same for every attempt
    (an elastic restart continues its runs); else a new one."""
    given = os.environ.get(INVOCATION_ENV)
    job = os.environ.get("TORCHELASTIC_RUN_ID") if ranks.active and not given else None
    folder: Any = None
    if ranks.writer and given:
        folder = Path(given)
    elif ranks.writer and job:
        folder = out / f"{label}-torchrun-{job}"
        folder.mkdir(parents=True, exist_ok=True)
        if folder.is_symlink():
            raise CfbenchError(f"{folder}: a symbolic link; refusing to write through it")
    elif ranks.writer:
        folder = new_invocation_folder(out, label)
    return broadcast(folder), bool(given or job)


def after_restart(run_dir: Path) -> str:
    """What a run folder asks of this attempt: "start" it, "resume" it from its checkpoint or leave
    it "finished". Only an elastic restart (torchrun, --max-restarts) meets folders of an earlier
    attempt; what one left without a checkpoint is cleared and started again."""
    if _attempt() == 0 or not run_dir.exists():
        return "start"
    step = next_step(run_dir)
    if step == "resume":
        print(f"restart: resuming {run_dir} from its checkpoint", file=sys.stderr)
    return step


def _attempt() -> int:
    """Which attempt this rank belongs to: cfbench's own restarts, or torchrun's in-place ones."""
    counts = [os.environ.get(ATTEMPT_ENV, "0"), os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")]
    return max(int(c) if c.isdigit() else 0 for c in counts)


def prepare_rank_logs(folder: Path) -> None:
    """The ranks' log folder, held like every entry of a run or invocation folder: made here (never
    through a planted link), a folder, and writable; else one line before any rank starts."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(folder)
    except FileExistsError:
        pass
    except OSError as err:
        raise CfbenchError(f"{folder}: cannot create the ranks' log folder ({err.strerror})") from None
    mode = os.lstat(folder).st_mode
    if stat.S_ISLNK(mode):
        raise CfbenchError(f"{folder}: a symbolic link; cfbench never writes through a link in a folder it may not "
                           "have made (remove it)")
    if not stat.S_ISDIR(mode):
        raise CfbenchError(f"{folder}: the ranks' log folder is not a folder; remove it")
    refuse_links(folder, "ranks' log folder")
    check_writable_folder(folder, "the ranks' log folder")


def launch_local(nproc: int, args: list[str], logs: Path, env: Optional[dict[str, str]] = None,
                 max_restarts: int = 0) -> None:
    """Run `python <args>` as `nproc` ranks (with `env` added), each rank's output in `logs`, up to
    1 + `max_restarts` attempts, each a new launch with its own rendezvous; returns when all ranks
    of an attempt finished, else raises CfbenchError with the last attempt's line saying which rank
    failed first and how. SIGTERM / Ctrl-C of this process stop the ranks and raise
    KeyboardInterrupt (its `signal_name` set)."""
    prepare_rank_logs(logs)
    for attempt in range(max_restarts + 1):
        try:
            _launch_once(nproc, args, logs, {**(env or {}), ATTEMPT_ENV: str(attempt)})
            return
        except CfbenchError as err:
            if attempt == max_restarts:
                raise
            print(f"cfbench: attempt {attempt + 1} of {max_restarts + 1}: {err}; starting the ranks again",
                  file=sys.stderr)


def _launch_once(nproc: int, args: list[str], logs: Path, env: dict[str, str]) -> None:
    import logging

    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    prefixes = ("torch.distributed.elastic", "torch.distributed.launcher")
    for name in [*prefixes, *logging.root.manager.loggerDict]:  # modules set their own levels
        if name.startswith(prefixes):
            logging.getLogger(name).setLevel(logging.CRITICAL)  # its warnings would bury the one line
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex, role="rank",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.2,
                          logs_specs=DefaultLogsSpecs(log_dir=str(logs), redirects=Std.ALL, tee=Std.ALL,
                                                      local_ranks_filter={0}))
    added = {**env, LAUNCHED_ENV: "1", LAUNCHER_ENV: str(os.getpid())}
    saved = {k: os.environ.get(k) for k in added}
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    os.environ.update(added)  # the ranks inherit this process's environment
    try:
        elastic_launch(config, entrypoint=sys.executable)(*args)
    except ChildFailedError as err:
        raise CfbenchError(failure_line(err.failures, nproc)) from None
    except SignalException as err:  # torch's launcher took SIGTERM / SIGINT over and stopped the ranks
        interrupted = KeyboardInterrupt()
        interrupted.signal_name = signal.Signals(err.sigval).name
        raise interrupted from None
    finally:
        for sig, handler in handlers.items():  # the launcher leaves its own handlers installed
            signal.signal(sig, handler)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def die_with_launcher() -> None:
    """In a rank: end with the process that launched it, even one killed outright (kill -9 of a
    launcher left its ranks training, holding their run folders). Linux only; a rank whose
    launcher is already gone ends at once."""
    launcher = os.environ.get(LAUNCHER_ENV)
    if not launcher or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if str(os.getppid()) != launcher:
        os._exit(1)


def failure_line(failures: dict, nproc: int) -> str:
    """The rank that failed first: one killed by a signal other than the launcher's SIGTERM (its
    peers then fail in their collectives), else the first that recorded an error, else any."""
    def killed(f) -> bool:
        return f.exitcode < 0 and -f.exitcode != signal.SIGTERM

    def order(item) -> tuple:
        when = _when(item[1])
        return not killed(item[1]), when is None, item[1].timestamp if when is None else when

    rank, failure = min(failures.items(), key=order)
    if killed(failure):
        return (f"rank {rank} of {nproc} (pid {failure.pid}) was killed by {failure.signal_name()}; the other ranks "
                "were stopped")
    return f"rank {rank} of {nproc} failed: {_recorded_message(failure)}"


def _when(failure) -> Optional[float]:
    """When a rank recorded its error (to the microsecond; record_rank_failure), or None (a rank the
    launcher stopped records none). A peer's error from a broken collective follows the first
    failure within the same second: the launcher's whole-second timestamps left the order to the
    rank number."""
    message = failure.message
    recorded = message.get("extraInfo", {}).get("cfbench_time") if isinstance(message, dict) else None
    return float(recorded) if isinstance(recorded, (int, float)) and not isinstance(recorded, bool) else None


def _recorded_message(failure) -> str:
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", message)
    text = str(message).strip() or f"exit status {failure.exitcode}"
    return text.splitlines()[-1] if "Traceback" in text else text


def record_rank_failure(err: BaseException) -> None:
    """In a rank the launcher started: the error goes to torch's elastic error file (the launcher
    reads it), not to the shared console."""
    path: Optional[str] = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    message = str(err) if isinstance(err, CfbenchError) else f"{type(err).__name__}: {err}"
    now = time.time()
    data = {"message": {"message": message, "extraInfo": {"py_callstack": _traceback(err),
                                                          "timestamp": str(int(now)), "cfbench_time": now}}}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)


def _traceback(err: BaseException) -> str:
    import traceback

    return "".join(traceback.format_exception(type(err), err, err.__traceback__))
