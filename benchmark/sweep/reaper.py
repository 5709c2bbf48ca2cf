"""The embedded Ray cluster of `cfbench sweep --ray local` dies with its driver.

Ray's own reaper ends the processes it started directly, but not those the raylet starts (its
dashboard and runtime-env agents, idle workers): after a `kill -9` of the driver (an OOM kill, a
cancelled job) they outlive it, and on a GPU box a worker holds the GPU the next run needs. So the
driver starts this watchdog in a session of its own. It keeps the list of the driver's descendant
processes (pid and start time) in the sweep folder, and when the driver is gone it ends every one
still alive. The next invocation of the same sweep ends whatever a lost watchdog left
(`end_stale`).

A record in a folder proves nothing: anyone who can write the sweep folder could name any process of
the user in it. So `end_stale` ends a recorded process only if it proves that the driver's cluster
started it: its pid and start time are on the record *and* its own environment (which a process
inherits from its parent and nobody else can set) carries the driver's random token -- Ray starts
its GCS, raylet and workers from the driver's environment -- or it is a descendant of such a process
(the kernel's parentage; Ray's agents rewrite their environment area with their process title). A
record whose driver still runs (a folder copied from a live sweep) is left alone. The watchdog itself
ends what it saw below the driver, from memory: it never reads a record back.

Run as `python -m benchmark.sweep.reaper DRIVER_PID RECORD_FILE`.
"""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import psutil

from ..errors import CfbenchError
from ..files import atomic_write_json
from ..records import read_reaper_record

RECORD = ".ray-processes-{pid}.json"  # one per driver: a finishing watchdog never removes a newer one's
TOKEN_ENV = "CFBENCH_CLUSTER_TOKEN"   # in the environment of every process the driver's cluster starts
POLL_S = 0.25


def mark_cluster() -> str:
    """A new random token in this (driver) process's environment, before it starts Ray: every
    process of the cluster inherits it, which is how the reaper tells them from any other."""
    token = secrets.token_hex(16)
    os.environ[TOKEN_ENV] = token
    return token


def start_watchdog(folder: Path) -> subprocess.Popen:
    """The watchdog for this (driver) process, recording into `folder`, detached so that a kill
    of the driver's process group leaves it to do its work. Call after `mark_cluster`."""
    if not os.environ.get(TOKEN_ENV):
        raise CfbenchError("the sweep's watchdog needs the cluster's token (mark_cluster before Ray starts)")
    record = folder / RECORD.format(pid=os.getpid())
    return subprocess.Popen([sys.executable, "-m", "benchmark.sweep.reaper", str(os.getpid()), str(record)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True)


def _descendants(pid: int) -> dict[int, float]:
    """{pid: start time} of every process below `pid` (this watchdog excluded)."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return {}
    found = {}
    for child in children:
        try:
            if child.pid != os.getpid():
                found[child.pid] = child.create_time()
        except psutil.Error:
            continue
    return found


def _carries(proc: psutil.Process, token: str) -> bool:
    try:
        return proc.environ().get(TOKEN_ENV) == token
    except psutil.Error:  # another user's process, or gone: not provably ours
        return False


def _alive(recorded: dict[int, float], token: Optional[str]) -> list[psutil.Process]:
    """The recorded processes that still run (the same pid with the same start time) and, given a
    `token`, carry it in their environment."""
    alive = []
    for pid, started in recorded.items():
        try:
            proc = psutil.Process(pid)
            if abs(proc.create_time() - started) < 0.01 and proc.status() != psutil.STATUS_ZOMBIE \
                    and (token is None or _carries(proc, token)):
                alive.append(proc)
        except psutil.Error:
            continue
    return alive


def end_processes(recorded: dict[int, float], token: Optional[str] = None, grace_s: float = 2.0) -> int:
    """SIGTERM to each recorded process still alive -- given a `token`, only those that carry it --
    and to their descendants, SIGKILL to those left after `grace_s`; returns how many were alive."""
    procs = _alive(recorded, token)
    for proc in list(procs):
        try:
            procs += [p for p in proc.children(recursive=True) if p not in procs]
        except psutil.Error:
            pass
    for proc in procs:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, left = psutil.wait_procs(procs, timeout=grace_s)
    for proc in left:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=grace_s)
    return len(procs)


def _write_record(record: Path, driver_pid: int, driver_started: float, token: str,
                  processes: dict[int, float]) -> None:
    atomic_write_json(record, {"driver": driver_pid, "driver_started": driver_started, "token": token,
                               "processes": {str(k): v for k, v in processes.items()}})


def _running(pid: int, started: float) -> bool:
    try:
        proc = psutil.Process(pid)
        return abs(proc.create_time() - started) < 0.01 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def end_stale(folder: Path) -> int:
    """Processes an earlier, killed driver of this sweep folder left (its watchdog lost too);
    call while holding the sweep folder's lock. Returns how many were ended. A record that is no
    regular file or not of the watchdog's shape is one line (records.read_reaper_record)."""
    ended = 0
    records = [(record, read_reaper_record(record)) for record in sorted(folder.glob(RECORD.format(pid="*")))]
    for record, data in records:  # every record read (or refused) before any process is ended
        if _running(data["driver"], data["driver_started"]):
            continue  # a live driver's (a copy of a running sweep's folder): its watchdog does the work
        ended += end_processes({int(pid): t for pid, t in data["processes"].items()}, data["token"])
        record.unlink(missing_ok=True)
    return ended


def watch(driver_pid: int, record: Path) -> None:
    """Until the driver is gone: keep the record of its descendants; then end them."""
    token = os.environ.get(TOKEN_ENV, "")
    try:
        driver = psutil.Process(driver_pid)
        started = driver.create_time()
    except psutil.Error:
        return
    known: dict[int, float] = {}
    while True:
        try:
            gone = driver.create_time() != started or driver.status() == psutil.STATUS_ZOMBIE
        except psutil.Error:
            gone = True
        if gone:
            break
        now = _descendants(driver_pid)
        if set(now) - set(known):
            known.update(now)
            try:
                _write_record(record, driver_pid, started, token, known)
            except Exception:  # the folder went away or is full: ending the processes still works
                pass
        time.sleep(POLL_S)
    end_processes(known)  # what this watchdog saw itself
    record.unlink(missing_ok=True)


if __name__ == "__main__":
    watch(int(sys.argv[1]), Path(sys.argv[2]))
