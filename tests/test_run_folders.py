"""Run folders under interruption and concurrency: exclusive folders, a lock for --resume, and a
kill -9 soak test whose resumed matrices equal an uninterrupted run byte for byte."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import yaml

from benchmark.cli import main
from benchmark.config import experiment_digest, load_config, load_run_config
from benchmark.report import run_folder
from benchmark.report.run_folder import hold_run_folder, new_invocation_folder
from benchmark.run.runner import run_strategy

SOAK = {"tasks": ["digits", "faces"], "eval_only": [], "strategies": ["ldifs"], "model": {"image_size": 32},
        "train": {"epochs": 2, "max_train_per_class": 12, "batch_size": 8, "warmup_steps": 2},
        "eval": {"probe_max_per_class": 8, "test_max_per_class": 8}, "threads": 1, "figures": False}


def test_invocations_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(run_folder.time, "strftime", lambda fmt: "20261127-120000")
    folders = [new_invocation_folder(tmp_path, "demo") for _ in range(3)]
    assert [f.name for f in folders] == ["20261127-120000-demo", "20261127-120000-demo-2", "20261127-120000-demo-3"]


def test_a_run_folder_is_held_by_one_process_and_refuses_a_second(tmp_path, capsys):
    cfg = load_config(None, {**SOAK, "strategies": ["ft"], "train": {**SOAK["train"], "epochs": 1}})
    part = run_strategy(cfg, "ft", tmp_path / "part", stop_after=1)
    with pytest.raises(Exception, match="already holds a run"):
        with hold_run_folder(part, resume=False, experiment=experiment_digest(cfg.to_dict())):
            pass
    resumed = load_run_config(part / "config.yaml")
    with hold_run_folder(part, resume=True, experiment=experiment_digest(resumed.to_dict())):  # as a running process would
        assert main(["run", "--resume", str(part)]) == 2
    err = capsys.readouterr().err
    assert f"in use by another cfbench process (pid {os.getpid()})" in err


def _start(args, cwd, cache):
    env = {**os.environ, "CFBENCH_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "benchmark", "run", *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _kill_when(proc, condition, delay: float, timeout: float = 240) -> bool:
    """kill -9 `delay` s after `condition()` first holds; False if the process ended first."""
    end = time.time() + timeout
    while time.time() < end and proc.poll() is None:
        if condition():
            time.sleep(delay)
            if proc.poll() is not None:
                return False
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.002)
    proc.wait(timeout=240)
    return False


def test_kill_minus_9_at_random_moments_then_resume_is_byte_identical(tmp_path):
    """Kills during the cache build, the pretrained evaluation / first task, the second task and the
    checkpoint write; restarts (no checkpoint yet) or resumes; the matrices equal an uninterrupted
    run's; no temporary file is left; the invocation's comparison is written by the last resume."""
    rng = random.Random(int(os.environ.get("CFBENCH_SOAK_SEED", "0")))
    cache, out = tmp_path / "cache", tmp_path / "out"
    config = tmp_path / "soak.yaml"
    config.write_text(yaml.safe_dump({**SOAK, "out": str(out)}))
    runs = lambda: sorted(out.glob("*/ldifs-s0"))  # noqa: E731
    checkpoint = lambda run: run / "checkpoints" / "state.pt"  # noqa: E731
    completed = lambda run: len(json.loads((run / "progress.json").read_text() or "{}").get("completed_tasks", []))  # noqa: E731
    hit = []

    proc = _start([str(config)], tmp_path, cache)  # 1: while the cache is being built
    if _kill_when(proc, lambda: any(cache.rglob("*.tmp")), rng.uniform(0, 0.05)):
        hit.append("cache build")
    proc = _start([str(config)], tmp_path, cache)  # 2: run folder up, no checkpoint yet
    if _kill_when(proc, lambda: runs() and (runs()[-1] / "progress.json").is_file(), rng.uniform(0, 1.0)):
        hit.append("before the first checkpoint")
        assert json.loads((runs()[-1] / "progress.json").read_text())["finished"] is False
    proc = _start([str(config)], tmp_path, cache)  # 3: during the second task
    if _kill_when(proc, lambda: runs() and checkpoint(runs()[-1]).is_file(), rng.uniform(0, 1.0)):
        hit.append("second task")
    run = runs()[-1]
    assert checkpoint(run).is_file(), "the third start should have finished its first task"
    proc = _start(["--resume", str(run)], tmp_path, cache)  # 4: while a checkpoint is written
    if _kill_when(proc, lambda: any((run / "checkpoints").glob("*.tmp")), 0.0):
        hit.append("checkpoint write")
    for _ in range(3):  # resume until finished
        if json.loads((run / "progress.json").read_text()).get("finished"):
            break
        proc = _start(["--resume", str(run)], tmp_path, cache)
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
    print("soak kills:", hit)
    assert {"cache build", "before the first checkpoint", "second task"} <= set(hit), hit

    reference = run_strategy(load_config(str(config)), "ldifs", tmp_path / "uninterrupted")
    for kind in ("lp", "head", "lp_ece"):
        assert (run / f"matrices/{kind}.csv").read_bytes() == (reference / f"matrices/{kind}.csv").read_bytes()
    assert json.loads((run / "metrics.json").read_text()) == json.loads((reference / "metrics.json").read_text())
    assert (run.parent / "comparison.md").is_file()  # the resume finished the invocation
    leftovers = [p for p in [*tmp_path.rglob("*.tmp"), *tmp_path.rglob(".*.tmp")]]
    assert not leftovers, leftovers
    assert completed(run) == 2
