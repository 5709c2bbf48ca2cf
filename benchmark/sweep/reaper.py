"""The embedded Ray cluster of `cfbench sweep --ray local` dies with its driver.

Ray's own reaper ends the processes it started directly, but not those the raylet starts (its
dashboard and runtime-env agents, idle workers): after a `kill -9` of the driver (an OOM kill, a
cancelled job) they outlive it, and on a GPU box a worker holds the GPU the next run needs. So the
driver starts this watchdog in a session of its own. It keeps the list of the driver's descendant
processes (pid and start time) in the sweep folder, and when the driver is gone it ends every one
still alive. The next invocation of the same sweep ends whatever a lost watchdog left
(`end_stale`): a process is ended only if its pid *and* start time are on the list, so never
another cluster's process, nor one that reused a pid.

Run as `python -m benchmark.sweep.reaper DRIVER_PID RECORD_FILE`.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from ..files import atomic_write_json

RECORD = ".ray-processes-{pid}.json"  # one per driver: a finishing watchdog never removes a newer one's
POLL_S = 0.25


def start_watchdog(folder: Path) -> subprocess.Popen:
    """The watchdog for this (driver) process, recording into `folder`, detached so that a kill
    of the driver's process group leaves it to do its work."""
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


def _alive(recorded: dict[int, float]) -> list[psutil.Process]:
    """The recorded processes that still run: the same pid with the same start time."""
    alive = []
    for pid, started in recorded.items():
        try:
            proc = psutil.Process(pid)
            if abs(proc.create_time() - started) < 0.01 and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.Error:
            continue
    return alive


def end_processes(recorded: dict[int, float], grace_s: float = 2.0) -> int:
    """SIGTERM to each recorded process still alive (and to its own descendants), SIGKILL to
    those left after `grace_s`; returns how many were alive."""
    procs = _alive(recorded)
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


def read_record(record: Path) -> dict[int, float]:
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
        return {int(pid): float(started) for pid, started in data["processes"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _write_record(record: Path, driver_pid: int, processes: dict[int, float]) -> None:

    atomic_write_json(record, {"driver": driver_pid, "processes": {str(k): v for k, v in processes.items()}})


def end_stale(folder: Path) -> int:
    """Processes an earlier, killed driver of this sweep folder left (its watchdog lost too);
    call while holding the sweep folder's lock. Returns how many were ended."""
    ended = 0
    for record in folder.glob(RECORD.format(pid="*")):
        ended += end_processes(read_record(record))
        record.unlink(missing_ok=True)
    return ended


def watch(driver_pid: int, record: Path) -> None:
    """Until the driver is gone: keep the record of its descendants; then end them."""
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
                _write_record(record, driver_pid, known)
            except Exception:  # the folder went away or is full: ending the processes still works
                pass
        time.sleep(POLL_S)
    end_processes(known)
    record.unlink(missing_ok=True)


if __name__ == "__main__":
    watch(int(sys.argv[1]), Path(sys.argv[2]))
