"""open_clip models through the same interface, loaded offline from a local checkpoint."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmark.cli import main
from benchmark.errors import CfbenchError
from benchmark.evaluation.evaluate import zero_shot_logits, zero_shot_weights
from benchmark.evaluation.matrix import Matrix
from benchmark.models.factory import create_model
from tests.helpers import THREADS


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_clip_checkpoint):
    return tiny_clip_checkpoint


def test_local_checkpoint_loads_offline(tiny_checkpoint):
    path, reference = tiny_checkpoint
    model = create_model("cfbench-tiny-vit", path).eval()
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        expected = reference.eval().encode_image(model.normalize(x))
        torch.testing.assert_close(model(x), expected)
    assert model.has_text and model.feature_dim == 16 and model.slice_layout == "nlc"


def test_unknown_model_and_bad_tag_are_clear_errors():
    with pytest.raises(CfbenchError, match="unknown open_clip model"):
        create_model("NoSuchNet", None)
    with pytest.raises(CfbenchError, match="local checkpoint path or one of"):
        create_model("ViT-B-32", "no-such-tag")


def test_zero_shot_weights_are_mean_of_normalized_prompts(tiny_checkpoint):
    path, _ = tiny_checkpoint
    model = create_model("cfbench-tiny-vit", path).eval()
    templates = ("a photo of a {}.", "a drawing of a {}.")
    w = zero_shot_weights(model, ["cat", "dog"], templates)
    with torch.no_grad():
        emb = F.normalize(model.encode_text(model.tokenizer(["a photo of a dog.", "a drawing of a dog."])), dim=-1)
    torch.testing.assert_close(w[1], F.normalize(emb.mean(0), dim=0))
    feats = torch.randn(3, 16)
    torch.testing.assert_close(zero_shot_logits(feats, w), 100 * F.normalize(feats, dim=-1) @ w.T)


def test_clip_run_fills_zero_shot_matrices(tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint
    args = ["run", "--model", "cfbench-tiny-vit", "--pretrained", path, "--tasks", "digits,faces",
            "--eval-only", "", "--strategy", "ldifs", "--epochs", "1", "--out", str(tmp_path), "--threads", str(THREADS)]
    import benchmark.config as config

    small = {"train": {"max_train_per_class": 8, "batch_size": 8, "warmup_steps": 1},
             "eval": {"probe_max_per_class": 6, "test_max_per_class": 5}}
    cfg_path = tmp_path / "small.yaml"
    cfg_path.write_text(config.dump_config(small))
    assert main([args[0], str(cfg_path), *args[1:]]) == 0
    (run,) = tmp_path.glob("*/ldifs-s0")
    zs = Matrix.load(run / "matrices/zs.csv")
    assert zs.rows == ["pretrained", "digits", "faces"]
    assert np.all((zs.array() >= 0) & (zs.array() <= 100))
    assert (run / "matrices/zs_ece.csv").is_file() and (run / "heatmap_zs.png").is_file()
    assert "zs" in json.loads((run / "metrics.json").read_text())


def test_zscl_runs_through_the_cli_on_a_tiny_clip(tiny_checkpoint, tmp_path):
    import benchmark.config as config

    path, _ = tiny_checkpoint
    cfg_path = tmp_path / "zscl.yaml"
    cfg_path.write_text(config.dump_config({
        "model": {"name": "cfbench-tiny-vit", "pretrained": path}, "tasks": ["digits", "faces"], "eval_only": [],
        "strategies": ["zscl"], "out": str(tmp_path), "threads": THREADS,
        "strategy_params": {"zscl": {"reference_task": "photo_patches", "ref_batch_size": 8, "avg_freq": 1}},
        "train": {"epochs": 1, "max_train_per_class": 8, "batch_size": 8, "warmup_steps": 1},
        "eval": {"probe_max_per_class": 6, "test_max_per_class": 5}, "figures": False}))
    assert main(["run", str(cfg_path)]) == 0
    (run,) = tmp_path.glob("*/zscl-s0")
    assert Matrix.load(run / "matrices/zs.csv").rows == ["pretrained", "digits", "faces"]
