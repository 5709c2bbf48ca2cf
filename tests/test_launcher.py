"""The multi-process launcher as a trust boundary: its restarts, its signals, its log folder. Ranks
here are small gloo scripts where the mechanism is the launcher's own (restarts), and real
`cfbench run --nproc 2` ranks where it is cfbench's (signals, dying with the launcher)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from benchmark.errors import CfbenchError
from benchmark.run.launch import launch_local, prepare_rank_logs
from tests.helpers import launcher_ranks, no_job_outlives_the_block

# A rank of a job with a real rendezvous: it joins the gloo group, reduces twice, and on the first
# attempt rank 1 is killed between the two reductions (mid-run); each finished rank leaves a file.
RANK = """
import os, signal, sys, torch, torch.distributed as dist
dist.init_process_group("gloo")
x = torch.ones(1)
dist.all_reduce(x)
if os.environ["CFBENCH_ATTEMPT"] == "0" and dist.get_rank() == 1:
    os.kill(os.getpid(), signal.SIGKILL)
dist.all_reduce(x)
open(os.path.join(sys.argv[1], f"done-{os.environ['CFBENCH_ATTEMPT']}-{dist.get_rank()}"), "w").write(str(x.item()))
dist.destroy_process_group()  # else gloo's threads may abort the exit (SIGABRT, "terminate called")
"""


def test_max_restarts_finishes_after_a_rank_is_killed_every_time(tmp_path):
    """--max-restarts 1 with a rank killed mid-run: the second attempt (a new launch, its own
    rendezvous) finishes, 5 of 5 tries. torch's in-place restart (torchrun --max-restarts 1, the same
    script) finished 1 of 3 here: one "connectFullMesh failed ... Connection refused", one hung for
    20 minutes. Without restarts the launcher's one line names the killed rank (test_distributed.py)."""
    for attempt in range(5):
        folder = tmp_path / f"try{attempt}"
        folder.mkdir()
        launch_local(2, ["-c", RANK, str(folder)], folder / ".ranks", max_restarts=1)
        assert sorted(p.name for p in folder.glob("done-*")) == ["done-1-0", "done-1-1"], attempt
        assert (folder / "done-1-0").read_text() == "4.0"  # both ranks reduced together, twice


@pytest.mark.parametrize("planted", ["link", "file", "read-only"])
def test_the_ranks_log_folder_is_held_like_a_run_folders_entries(tmp_path, planted):
    """.ranks planted as a link to an outside folder, as a file, or read-only: one line before any
    rank starts, and nothing written through the link."""
    outside = tmp_path / "outside"
    outside.mkdir()
    logs = tmp_path / "invocation" / ".ranks"
    logs.parent.mkdir()
    if planted == "link":
        logs.symlink_to(outside)
    elif planted == "file":
        logs.write_text("x")
    else:
        logs.mkdir()
        logs.chmod(0o500)
        if os.access(logs, os.W_OK):  # root writes anyway: what a trial write finds is the test
            logs.chmod(0o700)
            pytest.skip("this user writes into read-only folders")
    with pytest.raises(CfbenchError) as err:
        prepare_rank_logs(logs)
    assert str(logs) in str(err.value) and "\n" not in str(err.value)
    assert not any(outside.iterdir())


@pytest.fixture
def launched():
    """The `cfbench run --nproc 2` jobs a test starts, killed when it ends however it ends (their ranks
    die with them): a failed assertion once left two ranks training through the rest of the suite
    (pytest 440 -> 615 s)."""
    jobs: list[subprocess.Popen] = []
    yield jobs
    for job in jobs:
        if job.poll() is None:
            job.kill()
        job.communicate()


def _launcher(tmp_path: Path, launched: list) -> subprocess.Popen:
    tmp_path.mkdir()
    config = tmp_path / "long.yaml"
    config.write_text(yaml.safe_dump({"tasks": ["digits"], "eval_only": [], "strategies": ["ft"],
                                      "model": {"image_size": 32}, "train": {"epochs": 100}, "threads": 1,
                                      "figures": False}))
    launched.append(subprocess.Popen([sys.executable, "-m", "benchmark", "run", str(config), "--nproc", "2", "--device",
                                      "cpu", "--out", str(tmp_path / "out")], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True))
    return launched[-1]


def _wait_for(condition, launcher: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()[1][-3000:]
        time.sleep(0.1)


def test_the_launcher_ends_in_one_line_on_sigterm_and_takes_its_ranks_down_on_sigkill(tmp_path, launched):
    """SIGTERM of `cfbench run --nproc 2` once its ranks run: exit 143 and the documented one line,
    no traceback (torch's launcher takes the signal over). kill -9 of another: no rank left after
    15 s (they died with it; without PR_SET_PDEATHSIG both were still training)."""
    job = _launcher(tmp_path / "term", launched)
    _wait_for(lambda: len(launcher_ranks(job.pid)) == 2, job)
    time.sleep(1)
    job.send_signal(signal.SIGTERM)
    _, err = job.communicate(timeout=60)
    lines = [line for line in err.splitlines() if line.startswith("cfbench:")]
    assert job.returncode == 143 and len(lines) == 1 and lines[0].startswith("cfbench: interrupted (SIGTERM)"), err
    assert "Traceback" not in err and err.rstrip().endswith(lines[0])

    job = _launcher(tmp_path / "kill", launched)
    _wait_for(lambda: len(launcher_ranks(job.pid)) == 2, job)
    ranks = [psutil.Process(pid) for pid in launcher_ranks(job.pid).values()]
    job.kill()
    job.wait()
    gone, alive = psutil.wait_procs(ranks, timeout=15)
    assert not alive, [p.pid for p in alive]


def test_a_raw_torchrun_rank_refuses_what_cannot_run_over_its_ranks_before_any_folder(tmp_path, monkeypatch,
                                                                                      capfd, tiny_clip_checkpoint):
    """`torchrun ... -m benchmark run --strategy flyp`: each rank refuses before the invocation
    folder exists (it used to be left behind). The rank's place is set as torchrun's would be."""
    from benchmark.cli import main
    from benchmark.distributed import World
    import benchmark.run.launch as launch

    monkeypatch.setattr(launch, "join_ranks", lambda device: World(0, 2))
    config = tmp_path / "flyp.yaml"
    config.write_text(yaml.safe_dump({"tasks": ["digits"], "eval_only": [], "strategies": ["flyp"],
                                      "model": {"name": "cfbench-tiny-vit", "pretrained": tiny_clip_checkpoint[0]},
                                      "train": {"epochs": 1, "max_train_per_class": 4}}))
    assert main(["run", str(config), "--out", str(tmp_path / "out")]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "flyp cannot train over 2 processes" in err[0], err
    assert not (tmp_path / "out").exists()


def test_the_failure_line_names_the_rank_that_failed_first():
    """Within one second: the rank that recorded its error first, not the peer whose collective
    broke after it (the launcher's timestamps are whole seconds); a rank a signal killed (other than
    the launcher's SIGTERM) comes before any recorded error."""
    from types import SimpleNamespace

    from benchmark.run.launch import failure_line

    def failure(exitcode, message, when=None, name="SIGKILL"):
        extra = {"cfbench_time": when} if when is not None else {}
        return SimpleNamespace(exitcode=exitcode, timestamp=1000, pid=4242, signal_name=lambda: name,
                               message={"message": message, "extraInfo": extra})

    peer = failure(1, "RuntimeError: Connection closed by peer", when=1000.9)
    first = failure(2, "the model's weights are not finite", when=1000.2)
    assert failure_line({0: peer, 1: first}, 2) == "rank 1 of 2 failed: the model's weights are not finite"
    killed = failure(-9, "", name="SIGKILL")
    assert failure_line({0: first, 1: killed}, 2).startswith("rank 1 of 2 (pid 4242) was killed by SIGKILL")
    stopped = failure(-15, "", name="SIGTERM")  # the launcher's own stop of the others
    assert failure_line({0: stopped, 1: first}, 2).startswith("rank 1 of 2 failed")


def test_a_job_a_test_leaves_running_is_killed_and_reported():
    """The suite's guard (conftest): a cfbench job started in the block and still running after its
    grace is killed and fails the test; a job that ends within the grace, another program and a job
    started before the block are left alone."""
    def start(*code_and_args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", *code_and_args])

    earlier = start("import time; time.sleep(120)", "-m", "benchmark", "run")
    try:
        with pytest.raises(pytest.fail.Exception, match=r"^1 cfbench job\(s\) outlived the test and were killed: "
                                                        r".*time.sleep\(120\) -m benchmark run$"):
            with no_job_outlives_the_block(grace_s=1.0):
                ending = start("import time; time.sleep(0.2)", "-m", "benchmark", "run")
                stuck = start("import time; time.sleep(120)", "-m", "benchmark", "run")
                other = start("import time; time.sleep(120)")
        # the guard reaped both (their exit codes went to psutil): gone within seconds, not 120
        assert not psutil.pid_exists(stuck.pid) and not psutil.pid_exists(ending.pid)
        assert other.poll() is None and earlier.poll() is None
    finally:
        for job in (earlier, other):
            job.kill()
            job.wait()
