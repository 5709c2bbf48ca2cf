"""`cfbench run --nproc N` (and a sweep run with resources.num_gpus: N): the same work as N
processes on this machine, started by torch's elastic launcher (what `torchrun --standalone
--nproc-per-node N` does), never a home-made one.

Each rank's output goes to a folder of logs (rank 0's is shown as well). A rank that fails is
recorded by torch's elastic error file and the launcher stops the others; this process then prints
one line naming the rank that failed first -- the one a signal killed, else one with an error --
and what it was.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Optional

from ..errors import CfbenchError

LAUNCHED_ENV = "CFBENCH_LAUNCHED"      # set in the ranks: they leave the error line to the launcher


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
