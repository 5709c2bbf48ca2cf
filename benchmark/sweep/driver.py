"""`cfbench sweep`: a grid of runs fanned out over Ray, retried from checkpoints, seeds aggregated.

The driver (this module) reads and checks the whole sweep before anything starts
(sweep/config.py), holds the sweep folder `<out>/<name>/` (a lock: one driver per sweep),
starts or attaches to Ray, submits one Ray task per unfinished run (sweep/worker.py), keeps
`sweep.json` (sweep/state.py: each run's state, attempts, last error) and prints the
progress (sweep/progress.py); at the end it writes the comparison of the finished runs,
grouped over seeds.

Retries are the driver's, not Ray's: every task is submitted with Ray's `max_retries=0`, and a run
whose task raised or whose worker died is submitted again -- up to the sweep's `max_retries`
times per invocation -- as a new attempt of the same idempotent task, which resumes from the run's
last checkpoint. Doing it here rather than with Ray's `max_retries` + `retry_exceptions=True`
gives each attempt a number and an error line in sweep.json and in the log, and the same path
serves a run that failed in an earlier invocation of the sweep: running the same sweep again
skips finished runs (without starting Ray when all are finished) and resumes the others.

Resources: each run is one Ray task asking for `num_gpus` (default 1 when the cluster has GPUs)
and `num_cpus` (default: the cluster's CPUs / max_parallel, at most one node's); its torch threads
are those CPUs. At most `max_parallel` tasks are submitted at a time (default: one per GPU, or one
per node without GPUs). GPU runs get a fresh worker process each (Ray's default for GPU tasks: the
GPU memory is freed between runs); CPU runs reuse the worker processes (no second torch import).
"""
from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, TextIO

from ..errors import CfbenchError
from ..files import atomic_write_text
from ..records import marker_of, progress_of
from .config import SweepConfig, SweepPlan, load_sweep, ranks_for
from .progress import SweepProgress
from .reaper import end_stale, mark_cluster, start_watchdog
from .state import FolderStatus, SweepState, check_unchanged, folder_status, hold_sweep_folder
from .worker import LOGS, execute_run

ENV_PREFIXES = ("CFBENCH_",)   # the driver's variables a task sees (data root, cache)


# ---- Ray ------------------------------------------------------------------------------------

@dataclass
class Resources:
    max_parallel: int
    num_cpus: float
    num_gpus: float
    threads: int
    max_calls: int   # 1: a fresh worker process per run; 0: workers reused

    def describe(self) -> str:
        gpus = f", {self.num_gpus:g} GPU" if self.num_gpus else ", no GPU"
        return (f"{self.max_parallel} run(s) at a time, each {self.num_cpus:g} CPU(s) ({self.threads} torch "
                f"threads){gpus}")


def decide_resources(spec: SweepConfig, nodes: Sequence[tuple[float, float]],
                     max_parallel: Optional[int] = None) -> Resources:
    """Per-run CPUs and GPUs and the runs at a time, from the alive nodes' (CPUs, GPUs)."""
    if not nodes:
        raise CfbenchError("the Ray cluster has no alive node")
    total_cpus, total_gpus = sum(c for c, _ in nodes), sum(g for _, g in nodes)
    gpus = spec.resources.num_gpus if spec.resources.num_gpus is not None else (1.0 if total_gpus >= 1 else 0.0)
    parallel = max_parallel or spec.max_parallel
    if not parallel:
        parallel = max(1, int(total_gpus // gpus)) if gpus else len(nodes)
    cpus = spec.resources.num_cpus
    if cpus is None:
        cpus = float(min(max(1, math.floor(total_cpus / parallel)), max(c for c, _ in nodes)))
    if not any(c >= cpus and g >= gpus for c, g in nodes):
        raise CfbenchError(f"no node of the Ray cluster has {cpus:g} CPU(s) and {gpus:g} GPU(s) for one run "
                           f"(nodes: {', '.join(f'{c:g} CPUs/{g:g} GPUs' for c, g in nodes)}); set resources in "
                           "the sweep file")
    return Resources(parallel, cpus, gpus, max(1, int(cpus)), 1 if gpus else 0)


@contextlib.contextmanager
def ray_cluster(address: str, progress_note=print, folder: Optional[Path] = None) -> Iterator[list[tuple[float, float]]]:
    """Ray for the sweep: `local` starts an embedded one-node cluster with this machine's CPUs
    and GPUs (stopped at the end; a watchdog recording into `folder` ends it if this driver is
    killed, sweep/reaper.py), `auto` or an address attaches to a running cluster. A Ray the
    calling process started itself (a notebook, the tests) is used as it is and left running.
    Yields the alive nodes' (CPUs, GPUs)."""
    import ray

    owned = not ray.is_initialized()
    if owned:
        start = time.monotonic()
        kwargs = dict(log_to_driver=False, logging_level=logging.ERROR, namespace="cfbench")
        if address == "local":
            # Ray's default token authentication for a new cluster stays; its notice about it goes
            logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
            kwargs.update(address="local", include_dashboard=False, object_store_memory=256 * 1024 ** 2)
        else:
            kwargs.update(address=address)
        if address == "local" and folder is not None:
            mark_cluster()  # before Ray starts: every process of the cluster inherits the token
        try:
            ray.init(**kwargs)
        except Exception as err:  # connection, authentication and start-up errors of every kind
            text = (str(err).strip().splitlines() or [type(err).__name__])[0]
            hint = " (start one with `ray start --head`, see README \"Sweeps\")" if address != "local" else ""
            raise CfbenchError(f"--ray {address}: could not {'start' if address == 'local' else 'attach to'} "
                               f"Ray: {text[:300]}{hint}") from None
        if address == "local" and folder is not None:
            start_watchdog(folder)
        progress_note(f"Ray {'started' if address == 'local' else 'attached'} in {time.monotonic() - start:.1f} s")
    try:
        nodes = [(float(n["Resources"].get("CPU", 0)), float(n["Resources"].get("GPU", 0)))
                 for n in ray.nodes() if n.get("Alive")]
        yield nodes
    finally:
        if owned:
            ray.shutdown()


def error_line(err: BaseException, host: Optional[str] = None) -> str:
    """One line for a failed attempt: the run's own error, or how its worker died."""
    import ray.exceptions as rex

    where = f" on {host}" if host else ""
    if isinstance(err, rex.RayTaskError) and err.cause is not None and not isinstance(err.cause, rex.RayError):
        cause = err.cause
        text = str(cause) if isinstance(cause, CfbenchError) else f"{type(cause).__name__}: {cause}"
    elif isinstance(err, (rex.WorkerCrashedError, rex.LocalRayletDiedError, rex.NodeDiedError, rex.OutOfMemoryError,
                          rex.ObjectLostError)):
        text = f"the worker process died{where} ({type(err).__name__}: killed, out of memory, or its node lost)"
    elif isinstance(err, rex.TaskCancelledError):
        text = "cancelled"
    else:
        text = f"{type(err).__name__}: {err}"
    return (text.strip().splitlines() or [type(err).__name__])[0][:400]


# ---- running ---------------------------------------------------------------------------------

class Scheduler:
    """Submits the runs (at most max_parallel at a time), collects results, retries, polls progress."""

    def __init__(self, plan: SweepPlan, state: SweepState, resources: Resources, progress: SweepProgress,
                 poll_s: float = 2.0):
        self.plan, self.state, self.res, self.progress, self.poll_s = plan, state, resources, progress, poll_s
        self.submitted = 0

    def _spec(self, run, attempt: int) -> dict:
        cfg = run.config.replace(threads=self.res.threads)
        if not self.res.num_gpus and cfg.device == "auto":
            cfg = cfg.replace(device="cpu")  # no GPU was reserved for it
        return {"name": run.name, "sweep_dir": str(self.plan.folder), "config": cfg.to_dict(), "attempt": attempt,
                "nproc": ranks_for(self.res.num_gpus),
                "cwd": os.getcwd(), "env": {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}}

    def run(self, todo: list) -> None:
        import ray

        task = ray.remote(max_calls=self.res.max_calls)(execute_run).options(
            num_cpus=self.res.num_cpus, num_gpus=self.res.num_gpus, max_retries=0, retry_exceptions=False)
        queue = collections.deque(todo)
        tries: collections.Counter = collections.Counter()
        inflight: dict = {}
        try:
            while queue or inflight:
                while queue and len(inflight) < self.res.max_parallel:
                    run = queue.popleft()
                    tries[run.name] += 1
                    attempt = self.state.runs[run.name]["attempts"] + 1
                    inflight[task.remote(self._spec(run, attempt))] = (run, attempt)
                    self.submitted += 1
                    self.state.set(run.name, state="queued", attempts=attempt)
                    self.progress.state(run.name, "queued", f"attempt {attempt}")
                refs = list(inflight)
                ready, _ = ray.wait(refs, num_returns=1, timeout=self.poll_s)
                if ready:
                    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
                self._poll(inflight.values())
                for ref in ready:
                    run, attempt = inflight.pop(ref)
                    self._finished(ref, run, attempt, tries[run.name], queue)
                self.progress.refresh()
        except BaseException:
            for ref, (run, _) in inflight.items():
                ray.cancel(ref, force=True)
                self.state.set(run.name, state="failed", error="interrupted: the sweep stopped")
            raise

    def _finished(self, ref, run, attempt: int, tries: int, queue: collections.deque) -> None:
        import ray

        entry = self.state.runs[run.name]
        try:
            result = ray.get(ref)
        except Exception as err:  # the run's own error, wrapped by Ray, or its worker's death
            line = error_line(err, entry.get("host"))
            if tries <= self.plan.spec.max_retries:
                self.state.set(run.name, state="queued", error=line)
                self.progress.note(f"{run.name}: attempt {attempt} failed: {line}; retrying from its last "
                                   f"checkpoint ({tries} of {self.plan.spec.max_retries} retries)")
                self.progress.state(run.name, "queued")
                queue.appendleft(run)
            else:
                self.state.set(run.name, state="failed", error=line)
                self.progress.note(f"{run.name}: attempt {attempt} failed: {line}; no retries left")
                self.progress.state(run.name, "failed")
            return
        status = folder_status(self.plan.folder / run.name)
        marker = marker_of(self.plan.folder / LOGS / f"{run.name}.json")
        self.state.set(run.name, state="done", error=None, completed_tasks=status.completed,
                       host=marker.get("host", entry.get("host")), pid=marker.get("pid", entry.get("pid")))
        self.progress.tasks(run.name, status.completed)
        resumed = result.get("resumed_after")
        self.progress.state(run.name, "done", f"resumed after {resumed} task(s)" if resumed else "")

    def _poll(self, inflight) -> None:
        """Which submitted runs have started (their worker wrote logs/<run>.json for this attempt)
        and how many tasks each has finished (its progress.json)."""
        for run, attempt in list(inflight):
            entry = self.state.runs[run.name]
            marker = marker_of(self.plan.folder / LOGS / f"{run.name}.json")
            if entry["state"] == "queued" and marker.get("attempt") == attempt:
                self.state.set(run.name, state="running", host=marker.get("host"), pid=marker.get("pid"))
                self.progress.state(run.name, "running", f"attempt {attempt} on {marker.get('host')}")
            if entry["state"] == "running":
                done = progress_of(self.plan.folder / run.name).get("completed_tasks") or []
                if len(done) != entry["completed_tasks"]:
                    self.state.set(run.name, completed_tasks=len(done))
                    self.progress.tasks(run.name, len(done), str(done[-1]) if done else "")


# ---- the command -----------------------------------------------------------------------------

def visible_gpus() -> int:
    """The NVIDIA GPUs a local Ray would see, without importing torch (a dry run answers at once):
    CUDA_VISIBLE_DEVICES when set, else the driver's /proc/driver/nvidia/gpus entries."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and not d.strip().startswith("-")])
    gpus = Path("/proc/driver/nvidia/gpus")
    return len(list(gpus.iterdir())) if gpus.is_dir() else 0


def format_plan(plan: SweepPlan, statuses: dict[str, FolderStatus], ray_address: str,
                max_parallel: Optional[int]) -> str:
    """--dry-run: the expanded runs (name, strategy, seed, axis values, what a sweep would do)."""
    header = ["run", "strategy", "seed", *plan.axis_names, "state"]
    rows = [[r.name, r.strategy, str(r.seed), *(r.axes.get(a, "-") for a in plan.axis_names),
             statuses[r.name].describe(len(r.tasks))] for r in plan.runs]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = [f"sweep {plan.name}: {len(plan.runs)} runs in {plan.folder}"]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    if ray_address == "local":
        cpus, gpus = os.cpu_count() or 1, visible_gpus()
        res = decide_resources(plan.spec, [(float(cpus), float(gpus))], max_parallel)
        lines.append(f"resources (local Ray, {cpus} CPUs, {gpus} GPUs): {res.describe()}")
    else:
        lines.append(f"resources: decided by the Ray cluster ({ray_address}) when the sweep starts")
    return "\n".join(lines)


def run_sweep(path: str, ray_address: str = "local", max_parallel: Optional[int] = None, dry_run: bool = False,
              out: Optional[str] = None, poll_s: float = 2.0, stream: Optional[TextIO] = None) -> int:
    """The whole sweep; returns the exit status (0: every run finished, 1: some failed)."""
    stream = stream or sys.stderr
    plan = load_sweep(path, out)   # parsed, expanded, every run checked: nothing written yet
    check_unchanged(plan)
    statuses = {r.name: folder_status(plan.folder / r.name) for r in plan.runs}
    if dry_run:
        print(format_plan(plan, statuses, ray_address, max_parallel))
        return 0
    progress = SweepProgress({r.name: len(r.tasks) for r in plan.runs}, stream)
    with hold_sweep_folder(plan.folder):
        state = SweepState(plan, statuses)  # sweep.json read (or refused) before anything is written
        stale = end_stale(plan.folder)  # an earlier driver's cluster, if it and its watchdog were killed
        if stale:
            progress.note(f"ended {stale} process(es) of an earlier, killed invocation's Ray cluster")
        atomic_write_text(plan.folder / "sweep.yaml", plan.path.read_text(encoding="utf-8"))
        state.data["ray"] = ray_address
        state.save()
        todo = [r for r in plan.runs if not statuses[r.name].finished]
        for r in plan.runs:
            progress.states[r.name] = state.runs[r.name]["state"]
            progress.completed[r.name] = statuses[r.name].completed
        progress.note(f"{plan.name}: {len(plan.runs)} runs, {len(plan.runs) - len(todo)} already finished; "
                      f"folder {plan.folder}")
        scheduler = None
        if todo:
            with ray_cluster(ray_address, progress.note, plan.folder) as nodes:
                res = decide_resources(plan.spec, nodes, max_parallel)
                state.data["resources"] = {"max_parallel": res.max_parallel, "num_cpus": res.num_cpus,
                                           "num_gpus": res.num_gpus, "threads": res.threads}
                progress.note(f"{sum(c for c, _ in nodes):g} CPUs, {sum(g for _, g in nodes):g} GPUs on "
                              f"{len(nodes)} node(s): {res.describe()}")
                scheduler = Scheduler(plan, state, res, progress, poll_s)
                try:
                    scheduler.run(todo)
                finally:
                    progress.close()
        state.data["submitted_this_invocation"] = scheduler.submitted if scheduler else 0
        state.save()
        return _summary(plan, state)


def _summary(plan: SweepPlan, state: SweepState) -> int:

    done = [plan.folder / r.name for r in plan.runs if state.runs[r.name]["state"] == "done"]
    failed = [(name, r["error"]) for name, r in state.runs.items() if r["state"] == "failed"]
    if done:
        from ..report.compare import compare_runs  # matplotlib: not for --dry-run

        print(compare_runs(done, plan.folder, groups=True, figures=None))
    print(f"sweep {plan.name}: {len(done)} of {len(plan.runs)} runs done, {len(failed)} failed. {plan.folder}: "
          "sweep.json (states, attempts, errors), comparison.md/.csv/.png and comparison_groups.md/.csv (mean ± "
          "sample std over seeds), groups/<group>/ (mean matrices and their heatmaps), logs/<run>.log, one folder "
          "per run")
    for name, error in failed:
        print(f"failed: {name}: {error}", file=sys.stderr)
    if failed:
        print(f"cfbench: {len(failed)} run(s) failed; run the same command again to retry them from their "
              "checkpoints", file=sys.stderr)
        return 1
    return 0
