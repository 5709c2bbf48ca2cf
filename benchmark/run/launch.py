"""`cfbench run --nproc N` (and a sweep run with resources.num_gpus: N): the same work as N
processes on this machine, started by torch's elastic launcher (what `torchrun --standalone
--nproc-per-node N` does), never a home-made one. Also each rank's side of it: joining the process
group, the invocation folder rank 0 fills, and what an elastic restart does with the run folders of
an earlier attempt.

Each rank's output goes to a folder of logs (rank 0's is shown as well). A rank that fails is
recorded by torch's elastic error file and the launcher stops the others; this process then prints
one line naming the rank that failed first -- the one a signal killed, else one with an error --
and what it was.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Optional

import strategies

from ..config.schema import ModelConfig
from ..distributed import World, broadcast, init_from_env, launched
from ..errors import CfbenchError
from ..records import progress_of
from ..models.factory import check_batchnorm
from ..report.run_folder import CHECKPOINT, PROGRESS, new_invocation_folder, next_step

LAUNCHED_ENV = "CFBENCH_LAUNCHED"      # set in the ranks: they leave the error line to the launcher
INVOCATION_ENV = "CFBENCH_INVOCATION"  # the invocation folder `--nproc` made, for its rank 0 to fill
__all__ = ["after_restart", "broadcast", "check_launch", "invocation_folder", "join_ranks", "launch_ranks",
           "launched", "launch_local", "record_rank_failure"]


def check_launch(nproc: int, device: str, combos: list[str], model: ModelConfig) -> None:
    """Before any process starts: strategies that can train over `nproc` processes, a model without
    BatchNorm that trains, and one GPU per process, as torchrun assigns them (LOCAL_RANK)."""
    import torch

    for combo in combos:
        strategies.check_data_parallel(combo, nproc)
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
    except CfbenchError as err:
        stopped = sorted(d for d in invocation.iterdir() if (d / CHECKPOINT).is_file()
                         and not progress_of(d).get("finished"))
        hint = "".join(f"; finished tasks are checkpointed: continue with cfbench run --nproc {nproc} "
                       f"--resume {shlex.quote(str(d))}" for d in stopped[:1])
        raise CfbenchError(f"{err}{hint} (each rank's output: {invocation / '.ranks'})") from None
    return 0


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
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0 or not run_dir.exists():
        return "start"
    step = next_step(run_dir)
    if step == "resume":
        print(f"restart: resuming {run_dir} from its checkpoint", file=sys.stderr)
    return step


def launch_local(nproc: int, args: list[str], logs: Path, env: Optional[dict[str, str]] = None,
                 max_restarts: int = 0) -> None:
    """Run `python <args>` as `nproc` ranks (with `env` added), each rank's output in `logs`;
    returns when all finished, else raises CfbenchError with the one line that says which rank
    failed first and how."""
    import logging

    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    for name in ("torch.distributed.elastic", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.CRITICAL)  # its warnings would bury the one line
    logs.mkdir(parents=True, exist_ok=True)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex, role="rank",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=max_restarts,
                          monitor_interval=0.2,
                          logs_specs=DefaultLogsSpecs(log_dir=str(logs), redirects=Std.ALL, tee=Std.ALL,
                                                      local_ranks_filter={0}))
    added = {**(env or {}), LAUNCHED_ENV: "1"}
    saved = {k: os.environ.get(k) for k in added}
    os.environ.update(added)  # the ranks inherit this process's environment
    try:
        elastic_launch(config, entrypoint=sys.executable)(*args)
    except ChildFailedError as err:
        raise CfbenchError(failure_line(err.failures, nproc)) from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def failure_line(failures: dict, nproc: int) -> str:
    """The rank that failed first: one killed by a signal other than the launcher's SIGTERM (its
    peers then fail in their collectives), else one that recorded an error."""
    def killed(f) -> bool:
        return f.exitcode < 0 and -f.exitcode != signal.SIGTERM

    rank, failure = min(failures.items(), key=lambda item: (not killed(item[1]), item[1].timestamp))
    if killed(failure):
        return (f"rank {rank} of {nproc} (pid {failure.pid}) was killed by {failure.signal_name()}; the other ranks "
                "were stopped")
    return f"rank {rank} of {nproc} failed: {_recorded_message(failure)}"


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
    data = {"message": {"message": message, "extraInfo": {"py_callstack": _traceback(err),
                                                          "timestamp": str(int(time.time()))}}}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)


def _traceback(err: BaseException) -> str:
    import traceback

    return "".join(traceback.format_exception(type(err), err, err.__traceback__))
