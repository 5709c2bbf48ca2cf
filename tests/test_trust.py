"""A run or sweep folder is a trust boundary: links planted in it never make cfbench write outside
it; a checkpoint pins its experiment (an edited or incomplete config.yaml, an odd state.pt field:
one line, nothing changed); SIGTERM ends a run as Ctrl-C does; a full disk is one line with the
last file intact; files respect the umask."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from benchmark import files as store
from benchmark.cli import main
from benchmark.config import load_config
from benchmark.errors import CfbenchError
from benchmark.files import read_regular
from benchmark.run.runner import run_strategy

TINY = {"tasks": ["digits", "faces"], "eval_only": [], "strategies": ["ft"], "model": {"image_size": 32},
        "train": {"epochs": 1, "max_train_per_class": 4, "batch_size": 8, "warmup_steps": 2, "head_init": "zero"},
        "eval": {"probe_max_per_class": 6, "test_max_per_class": 6}, "threads": 2}


@pytest.fixture(scope="module")
def half_run(tmp_path_factory) -> Path:
    """A run folder after its first task of two (a checkpoint; resumable)."""
    root = tmp_path_factory.mktemp("half")
    return run_strategy(load_config(None, TINY), "ft", root / "ft-s0", stop_after=1)


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() and not p.is_symlink() else None)
            for p in sorted(folder.rglob("*"))}


def _one_error(capfd) -> str:
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("cfbench: error:") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("entry", [".lock", "log.txt", "progress.json", "matrices", "checkpoints/state.pt"])
def test_a_link_planted_in_a_run_folder_is_refused_and_its_target_untouched(half_run, tmp_path, capfd, entry):
    run = _copy(half_run, tmp_path)
    victim = tmp_path / "victim"
    if (run / entry).is_dir():
        shutil.copytree(run / entry, victim)
        shutil.rmtree(run / entry)
    else:
        victim.write_bytes(b"precious\n" if not (run / entry).is_file() else (run / entry).read_bytes())
        (run / entry).unlink(missing_ok=True)
    before = _snapshot(victim) if victim.is_dir() else victim.read_bytes()
    (run / entry).symlink_to(victim)
    assert main(["run", "--resume", str(run)]) == 2
    line = _one_error(capfd)
    assert "symbolic link" in line and entry.split("/")[0] in line
    assert (_snapshot(victim) if victim.is_dir() else victim.read_bytes()) == before


def test_plot_and_compare_refuse_links_where_they_write(half_run, tmp_path, capfd):
    run = _copy(half_run, tmp_path)
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"mine")
    (run / "heatmap_lp.png").symlink_to(victim)
    assert main(["plot", str(run)]) == 2
    assert "symbolic link" in _one_error(capfd) and victim.read_bytes() == b"mine"
    out = tmp_path / "out"
    out.mkdir()
    (out / "groups").symlink_to(tmp_path)
    assert main(["compare", str(run), "--out", str(out)]) == 2
    assert "symbolic link" in _one_error(capfd)


def test_a_link_in_a_sweep_folder_is_refused_before_ray_starts(tmp_path, capfd):
    sweep = tmp_path / "tiny.yaml"
    sweep.write_text(yaml.safe_dump({"name": "tiny", "base": TINY, "axes": {"strategies": ["ft"]}}))
    logs = tmp_path / "out" / "tiny" / "logs"
    logs.mkdir(parents=True)
    victim = tmp_path / "victim.log"
    victim.write_bytes(b"mine\n")
    (logs / "ft-s0.log").symlink_to(victim)
    assert main(["sweep", str(sweep), "--out", str(tmp_path / "out")]) == 2
    assert "symbolic link" in _one_error(capfd) and victim.read_bytes() == b"mine\n"
    assert not (tmp_path / "out" / "tiny" / "sweep.json").exists()


def _edit_config(run: Path, change) -> None:
    data = yaml.safe_load((run / "config.yaml").read_text())
    change(data)
    (run / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.mark.parametrize("change, expected", [
    (lambda d: d["train"].update(lr=0.5), "train.lr is not what this run was started with"),
    (lambda d: d.update(strategies=["l2sp"]), "strategies is not what this run was started with"),
    (lambda d: d["train"].pop("label_smoothing"), "lacks train.label_smoothing"),
    (lambda d: d.update(tasks=["faces", "digits"]), "tasks is not what this run was started with"),
])
def test_resume_refuses_a_config_that_is_not_the_runs_own(half_run, tmp_path, capfd, change, expected):
    run = _copy(half_run, tmp_path)
    _edit_config(run, change)
    before = _snapshot(run)
    assert main(["run", "--resume", str(run)]) == 2
    assert expected in _one_error(capfd)
    assert _snapshot(run) == before  # not even the lock file or progress.json changed


def test_resume_refuses_a_progress_file_of_another_experiment(half_run, tmp_path, capfd):
    run = _copy(half_run, tmp_path)
    progress = json.loads((run / "progress.json").read_text())
    (run / "progress.json").write_text(json.dumps({**progress, "experiment": "0123456789abcdef"}))
    assert main(["run", "--resume", str(run)]) == 2
    assert "no longer matches the experiment" in _one_error(capfd)


@pytest.mark.parametrize("field, value, expected", [
    ("completed", "x", "'completed' must be a whole number of tasks from 1 to 2"),
    ("completed", 7, "'completed' must be a whole number of tasks from 1 to 2"),
    ("model", None, "'model' is missing"),
    ("known_tasks", [5], "'known_tasks' must list task numbers below 1"),
    ("matrices", {"lp": ([], [], [])}, "'matrices' must hold the matrices"),
    ("plugins", "x", "'plugins' is not a list"),
    ("model", {"encoder.weight": torch.zeros(3)}, "the model weights name other parameters"),
])
def test_every_checkpoint_field_is_checked_before_use(half_run, tmp_path, capfd, field, value, expected):
    run = _copy(half_run, tmp_path)
    path = run / "checkpoints" / "state.pt"
    state = torch.load(path, weights_only=True)
    if value is None:
        del state[field]
    else:
        state[field] = value
    torch.save(state, path)
    assert main(["run", "--resume", str(run)]) == 2
    assert expected in _one_error(capfd)


def test_the_resumed_run_continues_with_its_own_settings(half_run, tmp_path, capfd):
    run = _copy(half_run, tmp_path)
    assert main(["run", "--resume", str(run), "--threads", "1"]) == 0  # machine settings may change
    progress = json.loads((run / "progress.json").read_text())
    assert progress["finished"] and progress["completed_tasks"] == ["digits", "faces"]


def test_sigterm_is_an_interruption_recorded_and_resumable(tmp_path):
    """What SLURM, Ray and docker send: one line, exit 143, `interrupted (SIGTERM)` in progress.json;
    before the first checkpoint the line says there is nothing to resume."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({**TINY, "out": str(tmp_path / "out"),
                                      "train": {**TINY["train"], "epochs": 30}}))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "benchmark", "run", str(config)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "out").glob("*/ft-s0/progress.json")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    last = err.strip().splitlines()[-1]
    run = next((tmp_path / "out").glob("*/ft-s0"))
    progress = json.loads((run / "progress.json").read_text())
    assert progress["error"] == "interrupted (SIGTERM)" and not progress["finished"]
    if (run / "checkpoints" / "state.pt").exists():
        assert last.endswith(f"continue with cfbench run --resume {run}")
    else:
        assert last == f"cfbench: interrupted (SIGTERM); no task of {run} had finished, so there is nothing to " \
                       "resume: start the run again"
    assert "Traceback" not in err


def test_a_full_disk_is_one_line_and_the_previous_file_stays_whole(tmp_path, monkeypatch):
    target = tmp_path / "run" / "checkpoints" / "state.pt"
    store.atomic_write_bytes(target, b"task 1")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.os, "fsync", full)
    with pytest.raises(CfbenchError, match=r"checkpoints: the disk is full \(no space left to write state.pt\)"):
        store.atomic_write_bytes(target, b"task 2")
    assert target.read_bytes() == b"task 1" and os.listdir(target.parent) == ["state.pt"]


def test_a_full_disk_while_a_checkpoint_streams_is_one_line_and_the_previous_file_stays_whole(tmp_path):
    """Checkpoints are serialised straight into the temporary file (store.atomic_write_with)."""
    target = tmp_path / "run" / "checkpoints" / "state.pt"
    store.atomic_write_bytes(target, b"task 1")

    def half_then_full(fh):
        fh.write(b"task 2, first half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(CfbenchError, match=r"checkpoints: the disk is full \(no space left to write state.pt\)"):
        store.atomic_write_with(target, half_then_full)
    assert target.read_bytes() == b"task 1" and os.listdir(target.parent) == ["state.pt"]


def test_a_disk_full_during_a_run_is_one_line_with_the_last_checkpoint_intact(half_run, tmp_path, capfd, monkeypatch):
    run = _copy(half_run, tmp_path)
    before = (run / "checkpoints" / "state.pt").read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.os, "fsync", full)  # every atomic write from now on: the next checkpoint first
    assert main(["run", "--resume", str(run)]) == 2
    err = capfd.readouterr().err  # the progress lines of the task it trained, then one error line
    errors = [line for line in err.splitlines() if line.startswith("cfbench:")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0] and "Traceback" not in err
    assert f"{run / 'checkpoints'}: the disk is full" in errors[0]
    assert (run / "checkpoints" / "state.pt").read_bytes() == before
    assert not list(run.rglob("*.tmp"))


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_respect_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        store.atomic_write_text(tmp_path / "metrics.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "metrics.json").stat().st_mode & 0o777 == mode


def test_reads_are_bounded_and_only_of_regular_files(tmp_path):
    (tmp_path / "endless").symlink_to("/dev/zero")
    with pytest.raises(CfbenchError, match="not a regular file"):
        read_regular(tmp_path / "endless", 1024, "manifest")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(CfbenchError, match="not a regular file"):
        read_regular(tmp_path / "fifo", 1024, "manifest")
    (tmp_path / "big").write_bytes(b"x" * 2048)
    with pytest.raises(CfbenchError, match="2,048 bytes, over the 1,024"):
        read_regular(tmp_path / "big", 1024, "manifest")


def test_shell_hints_quote_what_they_paste(tmp_path, capfd):
    root = tmp_path / "$(touch pwned)"
    assert main(["run", "--tasks", "cifar10,svhn", "--eval-only", "", "--data-root", str(root), "--check"]) == 2
    lines = capfd.readouterr().err.splitlines()
    assert lines[0] == "cfbench: error: 2 problems:" and len(lines) == 3, lines
    assert all(f"--data-root '{root}'`" in line for line in lines[1:]), lines
    assert main(["data", "check", "--tasks", "cifar10", "--data-root", str(root)]) == 1
    assert f"cfbench data download --tasks cifar10 --data-root '{root}'`" in capfd.readouterr().out


def test_a_sigterm_dropped_inside_a_weakref_callback_is_delivered_again(capfd):
    """SIGTERM's KeyboardInterrupt raised while Python runs a weakref callback is dropped there (Python
    prints a traceback and carries on): a rank's neighbour, stopped by the launcher, printed one and kept
    training. What main() installs delivers it again outside, with no traceback."""
    import weakref

    from benchmark import cli

    class Thing:
        pass

    def callback(_ref):
        cli._terminated(signal.SIGTERM, None)  # the handler, run inside the callback

    previous_alarm, previous_hook = signal.signal(signal.SIGALRM, cli._terminated), sys.unraisablehook
    sys.unraisablehook = cli._dropped_interruption
    try:
        with pytest.raises(KeyboardInterrupt) as caught:
            thing = Thing()
            ref = weakref.ref(thing, callback)
            del thing  # the callback runs here; its KeyboardInterrupt cannot leave it
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline:
                time.sleep(0.001)
        assert caught.value.signal_name == "SIGTERM" and ref() is None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_alarm)
        sys.unraisablehook = previous_hook
    assert "Traceback" not in capfd.readouterr().err
