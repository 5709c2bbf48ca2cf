"""What tests share: tiny random-weight models (never used as a pretrained default), configs, and the
processes a test starts (a launcher's ranks; no cfbench job outlives its test)."""
import os
from contextlib import contextmanager
from pathlib import Path

import open_clip
import psutil
import pytest
import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg

from benchmark.config import RunConfig, merge, resolve
from benchmark.models.clip import CLIPModel

# torch threads of a test's runs: under pytest-xdist (make test: 2 workers on 2 cores) one per worker.
# Two threads in each of two busy workers wait at OpenMP barriers: the ZSCL MTIL-shaped run took 64 s
# instead of 15 s.
THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1)


def tiny_layer(tmp_path) -> dict:
    return {"tasks": ["digits", "faces"], "eval_only": ["photo_patches"], "strategies": ["ft"],
            "model": {"image_size": 64},
            "train": {"epochs": 1, "max_train_per_class": 16, "batch_size": 16, "warmup_steps": 2},
            "eval": {"probe_max_per_class": 12, "test_max_per_class": 10, "batch_size": 128},
            "out": str(tmp_path / "results"), "threads": THREADS}


def tiny_config(tmp_path, *changes: dict) -> RunConfig:
    """The tiny offline run config with each mapping in `changes` laid over it key by key."""
    layer = tiny_layer(tmp_path)
    for change in changes:
        layer = merge(layer, change)
    return resolve(layer)


def tiny_clip_vit(layers: int = 12) -> CLIPModel:
    torch.manual_seed(0)
    clip = open_clip.CLIP(embed_dim=16,
                          vision_cfg=CLIPVisionCfg(layers=layers, width=32, head_width=16, patch_size=8, image_size=32),
                          text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))
    return CLIPModel(clip)


def tiny_clip_rn() -> CLIPModel:
    torch.manual_seed(0)
    clip = open_clip.CLIP(embed_dim=16,
                          vision_cfg=CLIPVisionCfg(layers=(1, 1, 1, 1), width=8, image_size=32),
                          text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))
    return CLIPModel(clip)


def split_key_third(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An attention in_proj tensor (query, key, value stacked) as (query and value, key). Softmax over
    the keys cancels q.b_k, so the key bias's gradient is zero in exact arithmetic: Adam trains it on
    rounding noise, and comparisons of two runs set it apart."""
    query, key, value = tensor.chunk(3)
    return torch.cat([query, value]), key


VIT_B_32_OPENAI_HUB = "models--timm--vit_base_patch32_clip_224.openai"  # open_clip's hf_hub of ViT-B-32 openai


def plant_hub_file(hub: Path, repo_folder: str, filename: str) -> Path:
    """A file where huggingface_hub's cache keeps it: snapshots/<commit>/<file>, refs/main -> commit."""
    snapshot = Path(hub) / repo_folder / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (Path(hub) / repo_folder / "refs").mkdir()
    (Path(hub) / repo_folder / "refs" / "main").write_text("0123abcd")
    (snapshot / filename).write_bytes(b"weights")
    return snapshot / filename


def parity_machine(tmp_path, seed: int) -> dict:
    """The machine settings of a parity test's tiny runs: fixture data, CPU, two threads, its own output
    (tables only: the comparisons read weights and matrices)."""
    return {"data_root": str(tmp_path / "data"), "device": "cpu", "threads": 2, "seed": seed,
            "out": str(tmp_path / "results"), "figures": False}


def assert_resumed_run_is_the_uninterrupted_one(full: Path, part: Path, marker: str) -> None:
    """`part`, stopped after its first task and resumed with `cfbench run --resume`, equals `full` bit for
    bit: every tensor of the final state.pt (which holds `marker`, the strategy's own state) and every
    matrix the runs wrote (zs, lp, head, ECE)."""
    from benchmark.cli import main
    from benchmark.report.run_folder import CHECKPOINT

    assert main(["run", "--resume", str(part)]) == 0
    a = torch.load(full / CHECKPOINT, weights_only=True)["model"]
    b = torch.load(part / CHECKPOINT, weights_only=True)["model"]
    assert a.keys() == b.keys() and any(marker in k for k in a)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    matrices = sorted(p.name for p in (full / "matrices").iterdir())
    assert {"lp.csv", "head.csv"} <= set(matrices) and matrices == sorted(p.name for p in (part / "matrices").iterdir())
    for name in matrices:
        assert (part / "matrices" / name).read_bytes() == (full / "matrices" / name).read_bytes(), name


def tiny_clip_model(checkpoint: str) -> CLIPModel:
    """The registered tiny CLIP (`cfbench-tiny-vit`) with a checkpoint's weights and its tokenizer."""
    return CLIPModel(open_clip.create_model("cfbench-tiny-vit", pretrained=checkpoint),
                     open_clip.get_tokenizer("cfbench-tiny-vit"))


def launcher_ranks(launcher: int) -> dict[int, int]:
    """{rank: pid} of a `cfbench run --nproc` / torchrun launcher's worker processes (RANK in their
    environment). A child that is already a zombie, or gone, is no rank (seen once: a short-lived
    helper whose environment could not be read)."""
    found = {}
    for child in psutil.Process(launcher).children():
        try:
            rank = child.environ().get("RANK")
        except psutil.NoSuchProcess:  # ZombieProcess included
            continue
        if rank is not None:
            found[int(rank)] = child.pid
    return found


def _cfbench_job(process: psutil.Process) -> bool:
    """`python -m benchmark...` (cfbench, its ranks, a sweep's worker), the `cfbench` script, or torchrun."""
    try:
        argv = process.cmdline()
    except psutil.Error:
        return False
    return (any(a == "-m" and b.split(".")[0] == "benchmark" for a, b in zip(argv, argv[1:]))
            or any(Path(a).name in ("cfbench", "torchrun") for a in argv[:2]) or "torch.distributed.run" in argv)


def _jobs() -> dict[int, psutil.Process]:
    return {p.pid: p for p in psutil.Process().children(recursive=True) if _cfbench_job(p)}


@contextmanager
def no_job_outlives_the_block(grace_s: float = 15.0):
    """A cfbench job started inside the block and still running grace_s after it ends is killed, with
    its children, and reported as a failure: a job a failed test leaves behind trains on through the
    rest of the suite (once: pytest 440 -> 615 s)."""
    before = set(_jobs())
    yield
    left = [p for pid, p in _jobs().items() if pid not in before]
    _, alive = psutil.wait_procs(left, timeout=grace_s) if left else ([], [])
    if not alive:
        return
    described = []
    for process in alive:
        try:
            described.append(" ".join(process.cmdline()))
            for child in [*process.children(recursive=True), process]:
                child.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
    pytest.fail(f"{len(alive)} cfbench job(s) outlived the test and were killed: " + "; ".join(described),
                pytrace=False)
