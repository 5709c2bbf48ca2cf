"""One run over several processes on the ldifs protocol's training (AdamW, clipping, the official probe)
on open_clip's ViT-B-32 architecture with ZS- and LP-init heads: every strategy of the matrix in 2 gloo
ranks against one process with the same global batch. Mutations tried, each fails it: LwF's old heads
without the gradient average (3.4e-2; measured again 2026-12-07), EWC's importances without the sum over
ranks (3.8e-5), L2SP's penalty on rank 0 alone (1.4e-3)."""
import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.test_distributed import _one_and_two
from tests.test_real_configs_demo import _assert_close_runs


# The `ldifs` protocol's training (AdamW lr 1e-5, weight decay 0.1, gradient clipping at 1, RandomResizedCrop,
# fp32, the official probe) on open_clip's ViT-B-32 image tower (width 768, 12 layers, patch 32; random
# weights) at 32 px. Its text tower is cut to one layer of width 64 (it only makes the ZS-init heads and
# ZSCL's targets; the whole one would add 63 M frozen parameters to every checkpoint). ft trains from
# ZS-init heads, lpft from the official probe's LP-init. Digits at lr 1e-12 as in test_real_configs_demo.py,
# for 2 steps (train.iterations: every step all-reduces 88 M gradients); faces's 16 images are its 2 steps,
# 15 + 1 (rank 1's shard of the last is empty: a stand-in of weight 0). ZSCL averages its weights every
# 2 steps, so in both tasks. Every data-parallel strategy of the protocols' rows is here (L2SP and EWC
# since 2026-12-07, when the smaller run above made room for them; before, they were measured by hand).
VIT_STRATEGIES = ["ft", "lpft", "l2sp", "ldifs", "ewc", "lwf", "zscl"]
# One process, threads 1 vs 2, measured on this config (2026-12-07), max / norm relative of the worst
# tensor, attention key biases apart (up to 1.6e-6): ft 3.5e-7 / 2.5e-7; lpft 1.2e-5 / 1.5e-6; l2sp 7.0e-7 /
# 5.5e-7; ldifs 3.3e-6 / 3.1e-6; ewc 3.5e-7 / 2.5e-7; lwf 7.0e-7 / 5.0e-7; zscl 5.1e-7 / 3.8e-7; lp matrices
# equal. 2 ranks: ft 1.8e-6 / 1.4e-6, lpft 9.9e-7, l2sp 8.8e-7, ldifs 4.8e-6 / 4.5e-6, ewc 1.8e-6, lwf
# 7.4e-6 / 2.4e-6, zscl 8.5e-7; key biases up to 1.9e-5 (l2sp; KEY_BIAS_TOLERANCE); lp matrices equal.
# (Before 2026-12-07 digits trained 6 steps and the probe and test took 5 images per class; the numbers
# were of the same size.) lwf is 3.4e-2 without the gradient average of the previous tasks' heads, which
# LwF's distillation trains outside the DDP wrapper.
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
           "train": {"epochs": 1, "iterations": 2, "max_train_per_class": 8, "batch_size": 15, "warmup_steps": 2,
                     "head_init": "zs", "lr": {"digits": 1e-12, "default": 1e-5}},
           "eval": {"probe_max_per_class": 3, "test_max_per_class": 3, "probe_iterations": 50},
           "strategy_params": {"zscl": {"ref_batch_size": 9, "avg_freq": 2}}, "threads": 1, "figures": False}
    path = folder / "vit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_two_gloo_ranks_train_the_ldifs_protocol_on_vit_b_32_as_one_process(vit_b32, tmp_path):
    checkpoint, configs = vit_b32
    one, two = _one_and_two(_vit_config(tmp_path, checkpoint), tmp_path, configs, VIT_STRATEGIES)
    _assert_close_runs(one, two, VIT_STRATEGIES, VIT_TOLERANCE, VIT_DEFAULT_TOLERANCE)
    assert "ZS-init head for faces" in (two / "ft-s0/log.txt").read_text()
    assert "LP-init head for faces: official probe" in (two / "lpft-s0/log.txt").read_text()
