import os
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*QP solver.*")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def tiny_cfg(tmp_path):
    """A real but tiny run: the packaged pretrained encoder at 32 px, package-only data."""
    from benchmark.config import DEFAULTS, apply_overrides

    return apply_overrides(DEFAULTS, {
        "tasks": ["digits", "faces"], "eval_only": ["photo_patches"], "strategies": ["ft"],
        "model": {"image_size": 64},
        "train": {"epochs": 1, "max_train_per_class": 16, "batch_size": 16, "warmup_steps": 2},
        "eval": {"probe_max_per_class": 12, "test_max_per_class": 10, "batch_size": 128},
        "out": str(tmp_path / "results"), "threads": 2,
    })
