import os
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*QP solver.*")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Tests build their own preprocessed cache, never touching the user's ~/.cache/cfbench."""
    old = os.environ.get("CFBENCH_CACHE")
    os.environ["CFBENCH_CACHE"] = str(tmp_path_factory.mktemp("cfbench-cache"))
    yield
    if old is None:
        os.environ.pop("CFBENCH_CACHE", None)
    else:
        os.environ["CFBENCH_CACHE"] = old


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
