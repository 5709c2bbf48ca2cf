"""`cfbench sweep` on an embedded Ray (2 CPUs, started once for this module): tiny offline runs
(packaged EfficientNet at 32 px, digits -> faces, 1 epoch, a few samples per class, zero-init
heads so that no LP-init probe is fitted) are byte-identical to run_strategy's, a worker killed
with kill -9 is resumed from its checkpoint, a second invocation starts nothing, the seed
aggregation equals a hand computation, and bad input is one line with nothing written."""
import contextlib
import csv
import io
import json
import logging
import math
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from benchmark.cli import main

ray = pytest.importorskip("ray")

BASE = {"tasks": ["digits", "faces"], "eval_only": [], "model": {"image_size": 32},
        "train": {"epochs": 1, "max_train_per_class": 4, "batch_size": 8, "warmup_steps": 2, "head_init": "zero"},
        "eval": {"probe_max_per_class": 6, "test_max_per_class": 6, "batch_size": 128}, "figures": False}
RUN_FILES = ("matrices/lp.csv", "matrices/head.csv", "matrices/lp_ece.csv", "metrics.json")


def _sweep_file(folder: Path, name: str, axes: dict, **extra) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "base": BASE, "axes": axes, **extra}))
    return path


@pytest.fixture(scope="module")
def local_ray():
    logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False,
             logging_level=logging.ERROR, object_store_memory=100 * 1024 ** 2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def sweep4(local_ray, tmp_path_factory):
    """2 strategies x 2 seeds, 2 at a time; returns (sweep file, sweep folder, exit status, stderr)."""
    root = tmp_path_factory.mktemp("sweep")
    path = _sweep_file(root, "tiny", {"strategies": ["ft", "l2sp"], "seeds": [0, 1]})
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(["sweep", str(path), "--out", str(root / "out"), "--max-parallel", "2"])
    return path, root / "out" / "tiny", rc, err.getvalue()


@pytest.fixture(scope="module")
def references(sweep4, tmp_path_factory):
    """The same four runs by run_strategy in this process, with the config the sweep gave each
    (1 torch thread: 2 CPUs / 2 runs at a time)."""
    from benchmark.run.runner import run_strategy
    from benchmark.sweep.config import load_sweep

    root = tmp_path_factory.mktemp("reference")
    out = {}
    for run in load_sweep(str(sweep4[0]), str(sweep4[1].parent)).runs:
        out[run.name] = run_strategy(run.config.replace(threads=1, device="cpu", out=str(root)), run.strategy,
                                     root / run.name)
    return out


def _same_files(run_dir: Path, reference: Path) -> None:
    for name in RUN_FILES:
        assert (run_dir / name).read_bytes() == (reference / name).read_bytes(), f"{run_dir.name}/{name}"


def test_every_run_finishes_byte_identical_to_run_strategy(sweep4, references):
    _, folder, rc, err = sweep4
    assert rc == 0
    state = json.loads((folder / "sweep.json").read_text())
    assert {n: (r["state"], r["attempts"], r["error"]) for n, r in state["runs"].items()} == \
        {n: ("done", 1, None) for n in ("ft-s0", "ft-s1", "l2sp-s0", "l2sp-s1")}
    assert state["resources"] == {"max_parallel": 2, "num_cpus": 1.0, "num_gpus": 0.0, "threads": 1}
    for name, reference in references.items():
        _same_files(folder / name, reference)
        assert yaml.safe_load((folder / name / "config.yaml").read_text())["threads"] == 1
    # not a terminal: one line per change, never a carriage return
    assert "\r" not in err
    assert err.count("ft-s0: done") == 1 and "[0 queued, 0 running, 4 done, 0 failed]" in err
    assert "l2sp-s1: 2/2 tasks" in err or "l2sp-s1: done" in err


def test_a_worker_killed_mid_run_is_resumed_from_its_checkpoint(sweep4, references, tmp_path):
    """kill -9 the process holding the run folder (its .lock holds the pid) once the first of the
    two tasks is checkpointed: the retry resumes after it and ends byte-identical."""
    path = _sweep_file(tmp_path, "killed", {"strategies": ["ft"], "seeds": [0]})
    run_dir = tmp_path / "out" / "killed" / "ft-s0"
    killed = []

    def kill_when_checkpointed():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                progress = json.loads((run_dir / "progress.json").read_text())
                pid = int((run_dir / ".lock").read_text().strip())
            except (OSError, ValueError):
                time.sleep(0.01)
                continue
            if progress.get("finished"):
                return
            if len(progress.get("completed_tasks", [])) >= 1 and (run_dir / "checkpoints/state.pt").is_file():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.01)

    watcher = threading.Thread(target=kill_when_checkpointed, daemon=True)
    watcher.start()
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(["sweep", str(path), "--out", str(tmp_path / "out"), "--max-parallel", "2"])
    watcher.join(5)
    assert killed, "the run finished before the watcher could kill it"
    assert rc == 0, err.getvalue()
    entry = json.loads((tmp_path / "out/killed/sweep.json").read_text())["runs"]["ft-s0"]
    assert (entry["state"], entry["attempts"], entry["error"]) == ("done", 2, None)
    assert "attempt 1 failed: the worker process died" in err.getvalue()
    assert "ft-s0: done (resumed after 1 task(s))" in err.getvalue()
    worker_log = (tmp_path / "out/killed/logs/ft-s0.log").read_text()
    assert f"=== attempt 1 on {os.uname().nodename}, pid {killed[0]}" in worker_log
    assert "=== attempt 2" in worker_log and "resuming" in worker_log
    assert "resumed after 1 task(s)" in (run_dir / "log.txt").read_text()
    _same_files(run_dir, references["ft-s0"])


def test_running_the_sweep_again_starts_nothing(sweep4, monkeypatch, capsys):
    import benchmark.sweep.driver as sweep

    path, folder, _, _ = sweep4
    before = {p: p.stat().st_mtime_ns for p in folder.glob("*/matrices/*.csv")}

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started although every run is finished")

    monkeypatch.setattr(sweep, "ray_cluster", no_ray)
    assert main(["sweep", str(path), "--out", str(folder.parent)]) == 0
    state = json.loads((folder / "sweep.json").read_text())
    assert state["submitted_this_invocation"] == 0
    assert all(r["state"] == "done" and r["attempts"] == 1 for r in state["runs"].values())
    assert {p: p.stat().st_mtime_ns for p in folder.glob("*/matrices/*.csv")} == before
    out = capsys.readouterr().out
    assert "| ft | ft | 2 | 0, 1 |" in out and "4 of 4 runs done, 0 failed" in out


def test_seed_groups_are_the_mean_sample_std_and_n_of_the_runs_metrics(sweep4):
    _, folder, _, _ = sweep4
    rows = {r["group"]: r for r in csv.DictReader((folder / "comparison_groups.csv").open())}
    assert set(rows) == {"ft", "l2sp"}
    checked = 0
    for group, row in rows.items():
        metrics = [json.loads((folder / f"{group}-s{seed}" / "metrics.json").read_text()) for seed in (0, 1)]
        assert (row["n"], row["seeds"], row["runs"]) == ("2", "0 1", f"{group}-s0 {group}-s1")
        for kind in ("lp", "head", "lp_ece"):
            for key, value in metrics[0][kind].items():
                values = [m[kind][key] for m in metrics if m[kind][key] is not None]
                if not values:
                    assert row[f"{kind}.{key} mean"] == "" and row[f"{kind}.{key} n"] == "0"
                    continue
                assert float(row[f"{kind}.{key} mean"]) == pytest.approx(sum(values) / len(values), abs=1e-12)
                mean = sum(values) / len(values)
                std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
                assert float(row[f"{kind}.{key} std"]) == pytest.approx(std, abs=1e-12)
                assert row[f"{kind}.{key} n"] == str(len(values))
                checked += 1
    assert checked >= 20
    lp = [np.loadtxt(folder / f"ft-s{s}/matrices/lp.csv", delimiter=",", skiprows=1, usecols=(1, 2)) for s in (0, 1)]
    mean = np.loadtxt(folder / "groups/ft/mean_lp.csv", delimiter=",", skiprows=1, usecols=(1, 2))
    np.testing.assert_allclose(mean, (lp[0] + lp[1]) / 2, atol=1e-4)
    assert (folder / "groups/ft/heatmap_mean_lp.png").stat().st_size > 5000
    md = (folder / "comparison_groups.md").read_text()
    avg = [json.loads((folder / f"l2sp-s{s}/metrics.json").read_text())["head"]["avg"] for s in (0, 1)]
    assert f"{np.mean(avg):.2f} ± {np.std(avg, ddof=1):.2f}" in md


def test_a_group_of_one_run_has_a_blank_std(sweep4, tmp_path):
    from benchmark.report.compare import _matrices, group_tables
    from benchmark.report.figures import group_runs

    run = sweep4[1] / "ft-s0"
    groups = group_runs([(run.name, yaml.safe_load((run / "config.yaml").read_text()),
                          json.loads((run / "metrics.json").read_text()), _matrices(run))])
    md, text = group_tables(groups)
    row = next(csv.DictReader(io.StringIO(text)))
    assert row["n"] == "1" and row["lp.avg std"] == "" and row["lp.avg n"] == "1" and row["lp.avg mean"]
    assert "±" not in md


def test_a_changed_sweep_file_does_not_reuse_runs_made_with_other_settings(sweep4, tmp_path, capsys):
    path, folder, _, _ = sweep4
    changed = yaml.safe_load(path.read_text())
    changed["base"]["train"]["lr"] = 0.01
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(changed))
    assert main(["sweep", str(tmp_path / "tiny.yaml"), "--out", str(folder.parent), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was started with other settings (train.lr: 0.001 there, 0.01 in" in err[0]


def test_dry_run_lists_the_expanded_runs_and_writes_nothing(tmp_path, capsys):
    from benchmark.sweep.config import load_sweep

    path = _sweep_file(tmp_path, "grid", {"strategies": ["ft", "ldifs"], "seeds": [0, 1],
                                          "strategy_params.ldifs.alpha": [1, 10.5],
                                          "sequences": [["digits", "faces"], ["faces", "digits"]]},
                       base={**BASE, "strategy_params": {"ldifs": {"alpha": 3, "cache": False}}})
    assert main(["sweep", str(path), "--dry-run", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert not (tmp_path / "out").exists()
    # the alpha axis applies to ldifs only: 2 orders x (ft + 2 ldifs) x 2 seeds
    assert "sweep grid: 12 runs" in out
    lines = {line.split()[0]: line.split() for line in out.splitlines()[2:-1]}
    assert lines["ldifs-faces-digits-alpha10.5-s1"] == ["ldifs-faces-digits-alpha10.5-s1", "ldifs", "1",
                                                        "faces-digits", "10.5", "new"]
    assert lines["ft-digits-faces-s0"] == ["ft-digits-faces-s0", "ft", "0", "digits-faces", "-", "new"]
    runs = {r.name: r.config for r in load_sweep(str(path), str(tmp_path / "out")).runs}
    assert runs["ldifs-faces-digits-alpha10.5-s1"].strategy_params["ldifs"] == {"alpha": 10.5, "cache": False}
    assert runs["ldifs-faces-digits-alpha10.5-s1"].tasks == ["faces", "digits"]
    assert runs["ft-digits-faces-s0"].strategy_params["ldifs"] == {"alpha": 3, "cache": False}


@pytest.mark.parametrize("sweep, message", [
    ({"axez": {}}, "unknown key 'axez'"),
    ({"axes": {"seeds": [0, "one"]}}, "axes.seeds[1] must be an integer, not 'one'"),
    ({"axes": {"seeds": 3}}, "axes.seeds must be a list"),
    ({"axes": {"seeds": []}}, "axes.seeds is empty"),
    ({"max_retries": -1}, "max_retries must be >= 0"),
    ({"resources": {"num_gpus": "all"}}, "resources.num_gpus must be"),
    ({"axes": {"strategy_params.ldifs.alpah": [1]}}, "ldifs has no parameter 'alpah'"),
    ({"axes": {"strategies": ["ft"], "strategy_params.ldifs.alpha": [1]}}, "applies to no run"),
    ({"axes": {"train.lrr": [1]}}, "unknown axis 'train.lrr'"),
    ({"axes": {"train.lr": ["fast"]}}, "run ft-lrfast-s0: train.lr must be"),
    ({"axes": {"seed": [1]}}, "not an axis (use the `seeds` axis)"),
    ({"axes": {"strategies": ["nope"]}}, "unknown strategy 'nope'"),
    ({"axes": {"sequences": [["digits", "nosuchtask"]]}}, "nosuchtask"),
    ({"protocol": "ldifs", "base": {**BASE, "protocol": "demo"}}, "two protocols named"),
    ({"base": {**BASE, "train": {"epochs": 0}}}, "train.epochs must be positive"),
])
def test_bad_sweep_files_are_one_line(tmp_path, capsys, sweep, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"base": BASE, **sweep}))
    assert main(["sweep", str(path), "--dry-run", "--out", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cfbench: error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_an_unwritable_output_folder_fails_in_one_line_and_writes_nothing(tmp_path, capsys):
    path = _sweep_file(tmp_path, "tiny", {"strategies": ["ft"]})
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["sweep", str(path), "--out", str(blocker / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"cfbench: error: --out {blocker / 'out' / 'tiny'}: {blocker} is a file, not a folder"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "tiny.yaml"]


def test_a_worker_that_cannot_write_the_sweep_folder_says_so_in_one_line(tmp_path, monkeypatch):
    """The check every task makes first (a folder that is not shared with the worker's node)."""
    from benchmark.config import validate
    from benchmark.errors import CfbenchError
    from benchmark.sweep import worker as sweep_worker

    monkeypatch.setattr(validate.os, "access", lambda *a: False)
    with pytest.raises(CfbenchError, match=r"^sweep folder .*: .* is not writable$"):
        sweep_worker.check_output_folder(tmp_path / "sweep")
    monkeypatch.undo()

    def refuse(self, data):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "write_bytes", refuse)
    with pytest.raises(CfbenchError, match="not writable from .* \\(Permission denied\\); it must be on a file system"):
        sweep_worker.check_output_folder(tmp_path / "sweep")


def test_resources_follow_the_cluster():
    from benchmark.errors import CfbenchError
    from benchmark.sweep.config import SweepConfig, SweepResources
    from benchmark.sweep.driver import decide_resources, ranks_for

    one_cpu_box = decide_resources(SweepConfig(), [(2.0, 0.0)])
    assert (one_cpu_box.max_parallel, one_cpu_box.num_cpus, one_cpu_box.num_gpus, one_cpu_box.threads,
            one_cpu_box.max_calls) == (1, 2.0, 0.0, 2, 0)
    gpu_box = decide_resources(SweepConfig(), [(32.0, 4.0)])
    assert (gpu_box.max_parallel, gpu_box.num_cpus, gpu_box.num_gpus, gpu_box.max_calls) == (4, 8.0, 1.0, 1)
    two_nodes = decide_resources(SweepConfig(), [(16.0, 0.0), (8.0, 0.0)], max_parallel=2)
    assert (two_nodes.max_parallel, two_nodes.num_cpus, two_nodes.threads) == (2, 12.0, 12)
    with pytest.raises(CfbenchError, match="no node of the Ray cluster has 4 CPU"):
        decide_resources(SweepConfig(resources=SweepResources(num_cpus=4)), [(2.0, 0.0)])
    # a run holding several whole GPUs trains over as many DDP processes
    four = decide_resources(SweepConfig(resources=SweepResources(num_gpus=4)), [(32.0, 8.0)])
    assert (four.max_parallel, four.num_gpus, ranks_for(four.num_gpus)) == (2, 4.0, 4)
    assert [ranks_for(g) for g in (0.0, 0.5, 1.0, 2.5)] == [1, 1, 1, 1]


def test_on_a_terminal_the_progress_is_one_line_redrawn_in_place():
    from benchmark.sweep.progress import SweepProgress

    stream = io.StringIO()
    progress = SweepProgress({"ft-s0": 2, "ft-s1": 2}, stream, live=True)
    progress.state("ft-s0", "running")
    progress.tasks("ft-s0", 1)
    progress.note("ft-s1: attempt 1 failed: boom; retrying")
    progress.close()
    text = stream.getvalue()
    assert text.count("\r\x1b[K") >= 3 and text.endswith("\n")
    assert "1 queued, 1 running, 0 done, 0 failed | ft-s0 1/2" in text
    assert "] ft-s1: attempt 1 failed: boom; retrying\n" in text


def test_a_run_that_keeps_failing_is_retried_then_failed_with_its_error_line(sweep4, tmp_path, capsys):
    """A run that raises on every attempt (its loss diverges): max_retries attempts more, then
    `failed` with the run's own one-line error in sweep.json (and progress.json); exit status 1."""
    path = _sweep_file(tmp_path, "diverges", {"strategies": ["ft"], "train.lr": [100.0],  # the largest lr and
                                              "train.weight_decay": [100.0]}, max_retries=1)  # decay accepted
    assert main(["sweep", str(path), "--out", str(tmp_path / "out"), "--max-parallel", "2"]) == 1
    (name, entry), = json.loads((tmp_path / "out/diverges/sweep.json").read_text())["runs"].items()
    assert (entry["state"], entry["attempts"]) == ("failed", 2)
    assert entry["error"].startswith("non-finite loss (") and "in task digits" in entry["error"]
    progress = json.loads((tmp_path / "out/diverges" / name / "progress.json").read_text())
    assert progress["error"] == entry["error"] and not progress["finished"]
    # no task finished, so no checkpoint: the second attempt cleared the folder and started again
    assert (tmp_path / "out/diverges/logs" / f"{name}.log").read_text().count("starting ") == 2
    err = capsys.readouterr().err
    assert f"failed: {name}: {entry['error']}" in err
    assert err.strip().splitlines()[-1].startswith("cfbench: 1 run(s) failed; run the same command again")


def test_an_unstarted_run_folder_is_cleared_only_when_it_holds_nothing_but_a_runs_files(tmp_path):
    import fcntl

    from benchmark.errors import CfbenchError
    from benchmark.report.run_folder import clear_unstarted

    run = tmp_path / "ft-s0"
    (run / "matrices").mkdir(parents=True)
    for name in ("progress.json", "config.yaml", "log.txt", "matrices/lp.csv", ".progress.json.x1.tmp"):
        (run / name).write_text("x")
    with open(run / ".lock", "a+") as held:  # another holder: refused, nothing removed
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(CfbenchError, match="in use by another cfbench process"):
            clear_unstarted(run)
    assert (run / "log.txt").exists()
    (run / "notes.md").write_text("mine")
    with pytest.raises(CfbenchError, match=r"holds files a run does not write \(notes.md\)"):
        clear_unstarted(run)
    (run / "notes.md").unlink()
    clear_unstarted(run)
    assert run.is_dir() and not any(run.iterdir())


def _alive(procs) -> list:
    import psutil

    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.Error:
            pass
    return alive


def test_a_killed_drivers_embedded_ray_cluster_dies_with_it(tmp_path):
    """kill -9 of a `cfbench sweep --ray local` driver (an OOM kill, a cancelled job): within 15 s
    no process of its Ray cluster (GCS, raylet, agents, workers) nor its watchdog is left."""
    import subprocess
    import sys

    import psutil

    base = {**BASE, "train": {**BASE["train"], "epochs": 50}}  # still training when killed
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump({"name": "long", "base": base, "axes": {"strategies": ["ft"]}}))
    proc = subprocess.Popen([sys.executable, "-m", "benchmark", "sweep", str(path), "--out", str(tmp_path / "out")],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    marker = tmp_path / "out" / "long" / "logs" / "ft-s0.json"
    deadline = time.monotonic() + 180
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.exists(), "the sweep's worker never started"
    cluster = psutil.Process(proc.pid).children(recursive=True)
    assert any("raylet" in p.name() for p in cluster) and len(cluster) >= 5
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 15
    while _alive(cluster) and time.monotonic() < deadline:
        time.sleep(0.25)
    assert not _alive(cluster), [p.name() for p in _alive(cluster)]


def _sleeper(env_extra: dict):
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env={**os.environ, **env_extra})


def _record(folder, token: str, processes: dict, driver: int = 123, driver_started: float = 1.0):
    (folder / f".ray-processes-{driver}.json").write_text(json.dumps(
        {"driver": driver, "driver_started": driver_started, "token": token,
         "processes": {str(pid): started for pid, started in processes.items()}}))


def test_the_next_invocation_ends_only_its_own_stale_processes(tmp_path):
    """A record left by a killed driver whose watchdog was lost too: a process on it is ended only
    if its pid and start time match and its environment carries the cluster's token. A reused pid
    (other start time) and a process of the user without the token (a planted record naming it with
    its true start time) survive."""
    import psutil

    from benchmark.sweep.reaper import TOKEN_ENV, end_stale

    token = "0123456789abcdef" * 2
    ours, reused, unrelated = _sleeper({TOKEN_ENV: token}), _sleeper({TOKEN_ENV: token}), _sleeper({})
    try:
        started = {p.pid: psutil.Process(p.pid).create_time() for p in (ours, reused, unrelated)}
        _record(tmp_path, token, {ours.pid: started[ours.pid], reused.pid: started[reused.pid] - 100.0,
                                  unrelated.pid: started[unrelated.pid]})
        assert end_stale(tmp_path) == 1
        assert ours.wait(timeout=10) is not None and reused.poll() is None and unrelated.poll() is None
        assert not list(tmp_path.glob(".ray-processes-*.json"))
    finally:
        for p in (ours, reused, unrelated):
            p.kill()
            p.wait()


def test_a_planted_reaper_record_ends_no_process_of_the_user(tmp_path):
    """A finished sweep's folder with a hand-written record naming another process of the user (its
    real pid and start time, any token): `cfbench sweep` leaves it alive. A record of a driver that
    still runs (a copy of a live sweep's folder) is not acted on, even for processes with its token."""
    import psutil

    from benchmark.sweep.reaper import TOKEN_ENV, end_stale

    token = "f" * 32
    victim, live_cluster = _sleeper({}), _sleeper({TOKEN_ENV: token})
    try:
        me = psutil.Process(os.getpid())
        _record(tmp_path, token, {victim.pid: psutil.Process(victim.pid).create_time()}, driver=1)
        _record(tmp_path, token, {live_cluster.pid: psutil.Process(live_cluster.pid).create_time()},
                driver=os.getpid(), driver_started=me.create_time())
        assert end_stale(tmp_path) == 0
        time.sleep(0.3)
        assert victim.poll() is None and live_cluster.poll() is None
    finally:
        for p in (victim, live_cluster):
            p.kill()
            p.wait()


@pytest.mark.parametrize("kind", ["fifo", "folder", "not-json", "wrong-shape", "huge-pid"])
def test_a_reaper_record_of_the_wrong_kind_is_one_line(tmp_path, kind):
    """The record is read by the strict reader: a FIFO does not hang, a folder is no traceback."""
    from benchmark.errors import CfbenchError
    from benchmark.sweep.reaper import end_stale

    record = tmp_path / ".ray-processes-7.json"
    if kind == "fifo":
        os.mkfifo(record)
    elif kind == "folder":
        record.mkdir()
    elif kind == "not-json":
        record.write_text("{")
    elif kind == "wrong-shape":
        record.write_text(json.dumps({"driver": "7", "driver_started": 1, "token": "0" * 32, "processes": {}}))
    else:
        record.write_text(json.dumps({"driver": 7, "driver_started": 1, "token": "0" * 32,
                                      "processes": {"99999999999999999999": 1.0}}))
    start = time.monotonic()
    with pytest.raises(CfbenchError) as err:
        end_stale(tmp_path)
    assert time.monotonic() - start < 5
    assert str(record) in str(err.value) and "\n" not in str(err.value)


def test_each_run_of_a_grid_is_its_settings_resolved_as_one_config(tmp_path):
    """The expansion builds runs from the base along copied paths (a 10,000-run dry run: 45.8 s ->
    1.8 s); each run must equal what resolve() makes of the base's settings with the run's axis
    values set: per-task maps laid over the protocol's, model mappings, sequences, combinations,
    parameters that do not apply to a strategy."""
    from benchmark.config import resolve
    from benchmark.config.overrides import set_path
    from benchmark.sweep.config import expand, read_sweep

    path = tmp_path / "mixed.yaml"
    path.write_text(yaml.safe_dump({
        "name": "mixed", "protocol": "ldifs",
        "base": {"tasks": ["mnist", "eurosat"], "eval_only": [], "train": {"epochs": {"mnist": 2, "default": 1}}},
        "axes": {"strategies": ["ft", "l2sp+ldifs"], "seeds": [0, 1], "sequences": [["mnist", "eurosat"], ["eurosat"]],
                 "models": ["ViT-B-32", {"name": "ViT-B-16", "image_size": 32}],
                 "train.epochs": [{"eurosat": 4}, 3], "strategy_params.ldifs.alpha": [1, 10]}}))
    plan = expand(path, read_sweep(path), str(tmp_path / "out"))
    assert len(plan.runs) == 2 * 2 * 2 * 2 * 2 * 2 - 16  # ft runs do not vary alpha
    base = resolve({"protocol": "ldifs", **read_sweep(path).base, "out": str(tmp_path / "out")}).to_dict()
    for run in plan.runs:
        tree = json.loads(json.dumps(base))
        tree.update(strategies=[run.strategy], seed=run.seed, out=str(plan.folder))
        sequence = next(v for v in [["mnist", "eurosat"], ["eurosat"]] if "-".join(v) == run.axes["sequences"])
        model = "ViT-B-32" if run.axes["models"] == "ViT-B-32" else {"name": "ViT-B-16", "image_size": 32}
        tree["tasks"] = sequence
        tree["model"] = {**tree["model"], **({"name": model} if isinstance(model, str) else model)}
        set_path(tree, ["train", "epochs"], {"eurosat": 4} if run.axes["train.epochs"] == "4" else 3)
        if "ldifs" in run.strategy:
            set_path(tree, ["strategy_params", "ldifs", "alpha"], int(run.axes["strategy_params.ldifs.alpha"]))
        assert run.config.to_dict() == resolve(tree).to_dict(), run.name


def test_a_dry_run_of_the_largest_sweep_answers_at_once(tmp_path, capsys):
    """10,000 runs (the cap): 45.8 s before the expansion was rebuilt (23 ms a run), 1.8 s after as
    a fresh command (BENCHMARKS.md); here in a warm process, under a bound far above that and far
    below the old time."""
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"name": "grid", "base": {"tasks": ["digits"], "eval_only": []},
                                    "axes": {"strategies": ["ft", "l2sp"], "seeds": list(range(10)),
                                             "train.weight_decay": [0.01 * i for i in range(10)],
                                             "train.lr": [0.001 * i for i in range(1, 51)]}}))
    start = time.monotonic()
    assert main(["sweep", str(path), "--dry-run", "--out", str(tmp_path / "out")]) == 0
    assert time.monotonic() - start < 20
    assert capsys.readouterr().out.startswith("sweep grid: 10000 runs")
    assert not (tmp_path / "out").exists()
