"""One run over several processes on the configurations users run (the demo protocol's pretrained
EfficientNet-Lite0 with frozen BatchNorm, AdamW and LP-init heads; the ldifs protocol's training on the
ViT-B-32 architecture with ZS- and LP-init heads): every data-parallel strategy in 2 gloo ranks against
one process with the same global batch. Mutations tried (each fails the demo test): BatchNorm trained
in the ranks, no DDP gradient average, shard weights of 1, LDIFS's and LwF's penalties unweighted;
LwF's old heads without the gradient average fail the ViT test (2.7e-2)."""
import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from benchmark.evaluation.matrix import Matrix
from tests.test_distributed import _files, _one_and_two


# The demo protocol as users run it: EfficientNet-Lite0 with its packaged ImageNet weights and frozen
# BatchNorm, AdamW (lr 1e-3, weight decay 0.1, warmup), LP-init heads; at its own 64 px (at 32 px its
# gradient through the saturated ReLU6s is ~1e-8, rounding noise that AdamW's normalisation turns into
# lr-sized steps of random sign: any change of summation order -- threads or ranks -- changes the run).
# Batch 15 over 2 ranks: shards of 8 and 7, and a last batch of 1 (rank 1 runs a stand-in of weight 0).
# Digits "trains" at lr 1e-12 so that faces starts from the same weights on both paths: a step at a
# penalty's minimum (EWC, LwF, LDIFS at the start of a task) is rounding noise times alpha, which
# AdamW's first steps also scale up to lr, and which would leave nothing to compare after the first task.
REAL_STRATEGIES = ["ft", "lpft", "l2sp", "ldifs", "ewc", "lwf", "wise-ft", "ls"]
# max and norm of |one process - 2 ranks| over max and norm of |one process|, worst tensor of each run.
# One process, threads 1 vs 2, measured on this config (2026-12-06): ft, lpft, wise-ft, ls <= 3.4e-5 /
# 7.2e-6; l2sp 3.8e-3 / 3.7e-5; ewc 3.0e-4 / 6.6e-5; lwf 3.1e-3 / 1.1e-4; ldifs 0.20 / 5.9e-2 (lp cell
# 3.75 points). 2 ranks measured: <= 3.4e-5 / 4.1e-6, but ldifs 1.8e-3 / 9.7e-5 and lwf 1.6e-3 / 9.8e-5.
# FT and L2SP are held to 1e-4 (the 1e-5 is below one process's own thread spread, 3.4e-5).
REAL_TOLERANCE = {"ldifs": (5e-3, 3e-4), "lwf": (5e-3, 3e-4)}
REAL_DEFAULT_TOLERANCE = (1e-4, 2e-5)


def _real_config(folder: Path) -> Path:
    cfg = {"protocol": "demo", "tasks": ["digits", "faces"], "eval_only": ["photo_patches"],
           "model": {"image_size": 64},
           "train": {"epochs": 1, "max_train_per_class": 8, "batch_size": 15, "warmup_steps": 2,
                     "lr": {"digits": 1e-12, "default": 1e-3}},
           "eval": {"probe_max_per_class": 10, "test_max_per_class": 8}, "threads": 1}
    path = folder / "demo-real.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _differences(one: Path, two: Path) -> tuple[float, float, str]:
    a = torch.load(one / "checkpoints/state.pt", weights_only=True)["model"]
    b = torch.load(two / "checkpoints/state.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    worst = (0.0, 0.0, "")
    for key, x in a.items():
        if x.is_floating_point():
            d = x - b[key]
            worst = max(worst, ((d.abs().max() / x.abs().max()).item(), (d.norm() / x.norm()).item(), key))
    return worst


def _assert_close_runs(one: Path, two: Path, strategies: list[str], tolerance: dict, default: tuple) -> None:
    """Per strategy: the worst tensor within (max, norm) relative tolerance, the lp cells within 0.5
    points, the same files."""
    for strategy in strategies:
        run_one, run_two = one / f"{strategy}-s0", two / f"{strategy}-s0"
        max_rel, norm_rel, key = _differences(run_one, run_two)
        max_tol, norm_tol = tolerance.get(strategy, default)
        assert max_rel <= max_tol and norm_rel <= norm_tol, f"{strategy} {key}: {max_rel:.2e} / {norm_rel:.2e}"
        lp_one, lp_two = (Matrix.load(r / "matrices/lp.csv") for r in (run_one, run_two))
        assert lp_one.rows == lp_two.rows and len(lp_one.rows) == 3
        assert all(abs(x - y) <= 0.5 for r1, r2 in zip(lp_one.values, lp_two.values) for x, y in zip(r1, r2)), strategy
        assert _files(run_one) == _files(run_two)
        assert "2 processes (DDP)" in (run_two / "log.txt").read_text()


def test_two_gloo_ranks_train_the_demo_protocol_as_one_process(tmp_path):
    """Every data-parallel strategy on the demo's real model, optimizer and heads (see REAL_STRATEGIES)."""
    one, two = _one_and_two(_real_config(tmp_path), tmp_path, os.environ.get("CFBENCH_OPEN_CLIP_CONFIGS", ""),
                            REAL_STRATEGIES)
    _assert_close_runs(one, two, REAL_STRATEGIES, REAL_TOLERANCE, REAL_DEFAULT_TOLERANCE)
    assert "LP-init head for faces: C=" in (two / "ft-s0/log.txt").read_text()


# The `ldifs` protocol's training (AdamW lr 1e-5, weight decay 0.1, gradient clipping at 1, RandomResizedCrop,
# fp32, the official probe) on open_clip's ViT-B-32 image tower (width 768, 12 layers, patch 32; random
# weights) at 32 px. Its text tower is cut to one layer of width 64 (it only makes the ZS-init heads and
# ZSCL's targets; the whole one would add 63 M frozen parameters to every checkpoint). ft trains from
# ZS-init heads, lpft from the official probe's LP-init. Digits at lr 1e-12 as above. L2SP and EWC,
# penalties of the weights alone, and LDIFS (measured here: 4.5e-6 / 4.4e-6) are checked on the EfficientNet
# and the tiny CLIP ViT; the suite's 10 minutes do not hold a fifth ViT-B-32 run.
VIT_STRATEGIES = ["ft", "lpft", "lwf", "zscl"]
# One process, threads 1 vs 2, measured on this config (2026-12-06): every strategy <= 6.6e-6 / 3.3e-6
# (lwf's old head). 2 ranks: <= 4.5e-6 / 4.4e-6 -- lwf was 2.7e-2 before the previous tasks' heads, which
# LwF's distillation trains outside the DDP wrapper, had their gradients averaged (now 7.6e-6).
VIT_TOLERANCE = {"lwf": (5e-5, 2e-5)}
VIT_DEFAULT_TOLERANCE = (1e-5, 1e-5)
VIT_B_32_SMALL_TEXT = {"embed_dim": 512, "vision_cfg": {"image_size": 32, "layers": 12, "width": 768, "patch_size": 32},
                       "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def vit_b32(tmp_path_factory):
    """(checkpoint, config folder) of the ViT-B-32 architecture above, random weights with no all-zero
    tensor (relative differences are then measured against weights of real size)."""
    import open_clip

    folder = tmp_path_factory.mktemp("vit-b-32")
    (folder / "cfbench-vit-b-32-small-text.json").write_text(json.dumps(VIT_B_32_SMALL_TEXT))
    open_clip.add_model_config(folder / "cfbench-vit-b-32-small-text.json")
    torch.manual_seed(0)
    model = open_clip.create_model("cfbench-vit-b-32-small-text")
    state = {k: v + 0.02 * torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state}, folder / "vit-b-32.pt")
    return str(folder / "vit-b-32.pt"), str(folder)


def _vit_config(folder: Path, checkpoint: str) -> Path:
    cfg = {"protocol": "ldifs", "tasks": ["digits", "faces"], "eval_only": ["photo_patches"],
           "model": {"name": "cfbench-vit-b-32-small-text", "pretrained": checkpoint, "image_size": 32,
                     "quick_gelu": False},
           "train": {"epochs": 1, "max_train_per_class": 8, "batch_size": 15, "warmup_steps": 2, "head_init": "zs",
                     "lr": {"digits": 1e-12, "default": 1e-5}},
           "eval": {"probe_max_per_class": 10, "test_max_per_class": 8, "probe_iterations": 50},
           "strategy_params": {"zscl": {"ref_batch_size": 9, "avg_freq": 3}}, "threads": 1}
    path = folder / "vit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_two_gloo_ranks_train_the_ldifs_protocol_on_vit_b_32_as_one_process(vit_b32, tmp_path):
    checkpoint, configs = vit_b32
    one, two = _one_and_two(_vit_config(tmp_path, checkpoint), tmp_path, configs, VIT_STRATEGIES)
    _assert_close_runs(one, two, VIT_STRATEGIES, VIT_TOLERANCE, VIT_DEFAULT_TOLERANCE)
    assert "ZS-init head for faces" in (two / "ft-s0/log.txt").read_text()
    assert "LP-init head for faces: official probe" in (two / "lpft-s0/log.txt").read_text()
