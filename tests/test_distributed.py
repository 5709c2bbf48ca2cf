"""One run over several processes (DDP, gloo on CPU): the global batch's arithmetic, and end to
end `cfbench run --nproc 2` against one process with the same global batch -- weights, matrices,
who writes, a rank killed with SIGKILL and `--resume` under the launcher."""
import json
import os
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from benchmark.cli import main
from benchmark.config.schema import ModelConfig
from benchmark.errors import CfbenchError
from benchmark.models.factory import check_batchnorm
from benchmark.run.launch import after_restart
from benchmark.distributed import World, shard, shard_weight
from benchmark.run.augment import RandomResizedCropBatch
from tests.helpers import launcher_ranks, tiny_clip_rn, tiny_clip_vit

STRATEGIES = ["ft", "ldifs", "ewc", "l2sp", "zscl"]
KINDS = ("lp", "zs", "head")  # accuracies: equal; calibration (ECE) follows weights that differ by ~1e-7
WEIGHT_RTOL = 1e-5


def test_shards_of_a_batch_that_does_not_divide_weight_back_to_its_mean():
    losses = torch.rand(7, dtype=torch.float64)
    ranks = [World(r, 3) for r in range(3)]
    assert [list(range(7))[shard(7, w)] for w in ranks] == [[0, 3, 6], [1, 4], [2, 5]]
    # DDP averages the ranks' gradients: (1/N) sum_r weight_r * mean_r = the global batch's mean
    shares = [shard_weight(7, w) * losses[shard(7, w)].mean() for w in ranks]
    assert torch.isclose(sum(shares) / 3, losses.mean(), rtol=1e-12)
    # a batch smaller than N: the rank without a sample runs a stand-in with weight 0
    assert shard(1, World(1, 2)) == slice(0, 1) and shard_weight(1, World(1, 2)) == 0.0
    assert shard_weight(8, World(1, 2)) == 1.0 and shard_weight(5, World()) == 1.0


def test_a_global_batch_is_cropped_the_same_on_any_number_of_ranks():
    x = torch.randint(0, 255, (5, 3, 24, 24), dtype=torch.uint8)
    augment = RandomResizedCropBatch((0.3, 1.0))
    torch.manual_seed(3)
    whole = augment(x)
    after_whole = torch.rand(1)
    for size in (2, 3):
        shards = []
        for rank in range(size):  # every rank starts from the same RNG state, as seeded runs do
            torch.manual_seed(3)
            part = shard(5, World(rank, size))
            shards.append(augment(x[part], 5, part))
            assert torch.equal(torch.rand(1), after_whole)  # every rank drew the whole batch's boxes
        for rank in range(size):
            assert torch.equal(shards[rank], whole[shard(5, World(rank, size))])


@pytest.fixture(scope="module")
def perturbed_clip(tiny_clip_checkpoint, tmp_path_factory):
    """The tiny random CLIP with no all-zero tensor (relative differences per tensor are then
    measured against weights of real size, as in a pretrained model), and its config folder for
    the ranks, which start afresh (CFBENCH_OPEN_CLIP_CONFIGS)."""
    _, model = tiny_clip_checkpoint
    torch.manual_seed(1)
    state = {k: v + 0.02 * torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("ddp") / "tiny-perturbed.pt"
    torch.save({"state_dict": state}, path)
    return str(path), str(Path(tiny_clip_checkpoint[0]).parent)


def _config(folder: Path, checkpoint: str, name: str, **train) -> Path:
    cfg = {"tasks": ["digits", "faces"], "eval_only": ["photo_patches"],
           "model": {"name": "cfbench-tiny-vit", "pretrained": checkpoint, "image_size": 32},
           # 15 does not divide by 2 ranks; SGD: Adam would turn the rounding noise of zero gradients
           # (attention key biases) into full steps, in one process as much as in two
           "train": {"epochs": 1, "max_train_per_class": 8, "batch_size": 15, "optimizer": "sgd", "lr": 3e-4,
                     "warmup_steps": 2, "head_init": "zs", **train},
           "eval": {"probe_max_per_class": 8, "test_max_per_class": 6, "batch_size": 32},
           # LDIFS's alpha 10 makes this random tiny model's training chaotic: one process with 1 and
           # with 2 threads ends 1e-1 apart after 80 steps; at alpha 1 within 2e-7
           "strategy_params": {"ldifs": {"alpha": 1.0}, "zscl": {"ref_batch_size": 9, "avg_freq": 3, "l2": 0.5}},
           "threads": 1, "figures": False}  # what the two paths compute; figures are drawn from it
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _launch(config, out, configs: str, *extra: str, wait: bool = True):
    env = {**os.environ, "CFBENCH_OPEN_CLIP_CONFIGS": configs}
    cmd = [sys.executable, "-m", "benchmark", "run", *([str(config)] if config else []), "--nproc", "2", *extra]
    if out:
        cmd += ["--out", str(out)]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _one_process(config: Path, out: Path, configs: str, strategies: list[str] = STRATEGIES) -> Path:
    saved, threads = os.environ.get("CFBENCH_OPEN_CLIP_CONFIGS"), torch.get_num_threads()
    os.environ["CFBENCH_OPEN_CLIP_CONFIGS"] = configs
    try:
        assert main(["run", str(config), "--out", str(out), *[f"--strategy={s}" for s in strategies]]) == 0
    finally:
        torch.set_num_threads(threads)
        os.environ.pop("CFBENCH_OPEN_CLIP_CONFIGS") if saved is None else os.environ.update(
            CFBENCH_OPEN_CLIP_CONFIGS=saved)
    (invocation,) = out.iterdir()
    return invocation


def _both(perturbed_clip, folder: Path, name: str, **train) -> tuple[Path, Path, Path]:
    """(config, the 1-process invocation, the 2-rank invocation) of every strategy."""
    checkpoint, configs = perturbed_clip
    config = _config(folder, checkpoint, name, **train)
    return (config, *_one_and_two(config, folder, configs, STRATEGIES))


def _one_and_two(config: Path, folder: Path, configs: str, strategies: list[str]) -> tuple[Path, Path]:
    """(the 1-process invocation, the 2-rank invocation) of `strategies` on `config`."""
    # the ranks start (imports: most of a launch's time) while this process trains; one thread each
    ranks = _launch(config, folder / "two", configs, *[f"--strategy={s}" for s in strategies], wait=False)
    one = _one_process(config, folder / "one", configs, strategies)
    _, stderr = ranks.communicate(timeout=600)
    assert ranks.returncode == 0, stderr[-3000:]
    (two,) = (folder / "two").iterdir()  # rank 1 made no folder of its own
    return one, two


@pytest.fixture(scope="module")
def plain_runs(perturbed_clip, tmp_path_factory):
    """No augmentation (LDIFS reads its references from the per-sample cache each rank builds), and
    a second task long enough to kill a rank in."""
    return _both(perturbed_clip, tmp_path_factory.mktemp("plain"), "plain", augment={"kind": "none"},
                 epochs={"faces": 40, "default": 1})


def _files(run: Path) -> set[str]:
    return {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()}


def _assert_same_run(one: Path, two: Path) -> None:
    a = torch.load(one / "checkpoints/state.pt", weights_only=True)["model"]
    b = torch.load(two / "checkpoints/state.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for key, x in a.items():
        if x.is_floating_point():
            rel = ((x - b[key]).abs().max() / x.abs().max()).item()
            assert rel <= WEIGHT_RTOL, f"{one.name} {key}: relative difference {rel:.2e}"
    for kind in KINDS:
        assert (one / f"matrices/{kind}.csv").read_text() == (two / f"matrices/{kind}.csv").read_text(), kind
    assert _files(one) == _files(two)


def _assert_same_runs(one: Path, two: Path) -> None:
    for strategy in STRATEGIES:
        _assert_same_run(one / f"{strategy}-s0", two / f"{strategy}-s0")
    assert {p.name for p in two.iterdir()} == {p.name for p in one.iterdir()} | {".ranks"}


def test_two_gloo_ranks_train_every_strategy_as_one_process(plain_runs, tmp_path):
    _, one, two = plain_runs
    _assert_same_runs(one, two)
    # figures: false -- tables and CSVs only, in the runs and the invocation; `plot` draws them later
    assert not list(one.rglob("*.png")) and not list(two.rglob("*.png"))
    assert (one / "comparison.md").is_file() and (one / "comparison.csv").is_file()
    run = tmp_path / "ft-s0"
    shutil.copytree(one / "ft-s0", run)
    assert main(["plot", str(run)]) == 0
    assert {p.name for p in run.glob("*.png")} >= {"heatmap_lp.png", "heatmap_delta_lp.png", "curves_lp.png"}


def test_two_gloo_ranks_train_every_strategy_as_one_process_with_augmentation(perturbed_clip, tmp_path):
    _, one, two = _both(perturbed_clip, tmp_path, "rrc", augment={"kind": "rrc", "scale": [0.5, 1.0]})
    _assert_same_runs(one, two)


def test_a_killed_rank_ends_the_job_in_one_line_and_resume_under_the_launcher_is_exact(perturbed_clip, plain_runs,
                                                                                      tmp_path):
    configs = perturbed_clip[1]
    config, _, uninterrupted = plain_runs
    reference = uninterrupted / "ft-s0"
    run = _kill_rank_1_in_the_second_task(config, tmp_path / "killed", configs)
    _, stderr = run.job.communicate(timeout=120)
    assert run.job.returncode != 0
    errors = [line for line in stderr.splitlines() if line.startswith("cfbench:")]
    assert len(errors) == 1 and "rank 1 of 2" in errors[0] and "SIGKILL" in errors[0], stderr[-3000:]
    assert "Traceback" not in stderr
    assert f"--nproc 2 --resume {run.folder}" in errors[0]
    assert json.loads((run.folder / "progress.json").read_text())["completed_tasks"] == ["digits"]
    _launch(None, None, configs, "--resume", str(run.folder))
    _assert_identical(run.folder, reference)


class _Killed:
    def __init__(self, job, folder: Path):
        self.job, self.folder = job, folder


def _kill_rank_1_in_the_second_task(config: Path, out: Path, configs: str) -> _Killed:
    job = _launch(config, out, configs, "--strategy=ft", wait=False)
    deadline = time.monotonic() + 300
    try:
        while not list(out.glob("*/ft-s0/checkpoints/state.pt")):  # the first task finished
            assert job.poll() is None, job.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the first task did not finish in 300 s"
            time.sleep(0.05)
        os.kill(launcher_ranks(job.pid)[1], signal.SIGKILL)
    except BaseException:  # a failed wait must not leave the job training through the rest of the suite
        job.kill()  # its ranks die with it
        job.communicate()
        raise
    (folder,) = out.glob("*/ft-s0")
    return _Killed(job, folder)


def _assert_identical(run: Path, reference: Path) -> None:
    for kind in ("lp", "zs", "head", "lp_ece", "zs_ece"):
        assert (run / f"matrices/{kind}.csv").read_bytes() == (reference / f"matrices/{kind}.csv").read_bytes()
    resumed = torch.load(run / "checkpoints/state.pt", weights_only=True)["model"]
    uninterrupted = torch.load(reference / "checkpoints/state.pt", weights_only=True)["model"]
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


def test_an_elastic_restart_continues_what_the_last_attempt_left(tmp_path, monkeypatch):
    """torchrun --max-restarts (or cfbench run --max-restarts) starts every rank again in the same
    invocation folder; each run folder says what the new attempt does with it."""
    run = tmp_path / "ft-s0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "progress.json").write_text(json.dumps({"completed_tasks": ["digits"], "finished": False}))
    assert after_restart(run) == "start"  # a first attempt never meets an earlier one's folder
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert after_restart(tmp_path / "absent") == "start"
    (run / "checkpoints/state.pt").write_bytes(b"")
    assert after_restart(run) == "resume"
    (run / "checkpoints/state.pt").unlink()
    (run / "log.txt").write_text("killed in its first task\n")
    assert after_restart(run) == "start" and not any(run.iterdir())  # no checkpoint: cleared, started again
    (run / "progress.json").write_text(json.dumps({"completed_tasks": ["digits", "faces"], "finished": True}))
    assert after_restart(run) == "finished"


def test_what_cannot_run_over_several_processes_is_refused_before_any_starts(perturbed_clip, tmp_path, capsys):
    checkpoint, _ = perturbed_clip
    config = _config(tmp_path, checkpoint, "refused")
    out = tmp_path / "out"
    assert main(["run", str(config), "--strategy=flyp", "--nproc", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "flyp cannot train over 2 processes: its contrastive loss couples" in err[0]
    if not torch.cuda.is_available():
        assert main(["run", str(config), "--strategy=ft", "--nproc", "2", "--device", "cuda", "--out", str(out)]) == 2
        assert "--nproc 2 trains one process per GPU but 0 GPU(s) are visible" in capsys.readouterr().err
    efficientnet = tmp_path / "bn.yaml"  # the demo's model, its BatchNorm trained
    efficientnet.write_text(yaml.safe_dump({"protocol": "demo", "model": {"freeze_bn": False}}))
    assert main(["run", str(efficientnet), "--nproc", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.freeze_bn false trains efficientnet_lite0's BatchNorm" in err[0], err
    assert not out.exists()
    # each rank refuses too (raw torchrun); a model without BatchNorm is not refused
    with pytest.raises(CfbenchError, match="over 2 processes would be each rank's shard"):
        check_batchnorm(ModelConfig(freeze_bn=False), 2, tiny_clip_rn().train())
    check_batchnorm(ModelConfig(freeze_bn=False), 1, tiny_clip_rn())
    check_batchnorm(ModelConfig(freeze_bn=False), 2, tiny_clip_vit(2))
    check_batchnorm(ModelConfig(freeze_bn=True), 2, tiny_clip_rn())


def test_two_gloo_ranks_give_each_image_its_one_view_as_one_process(perturbed_clip, tmp_path):
    """augment.once under DDP: every rank draws the task's table of views alike and crops its own
    samples by their positions in the split, so the run equals one process. Tried: boxes taken by
    position in the minibatch (the shard's, not the split's) fails it."""
    checkpoint, configs = perturbed_clip
    config = _config(tmp_path, checkpoint, "once", augment={"kind": "rrc", "scale": [0.5, 1.0], "once": True})
    one, two = _one_and_two(config, tmp_path, configs, ["ft"])
    _assert_same_run(one / "ft-s0", two / "ft-s0")
