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
    """A real but tiny run: the packaged pretrained encoder at 64 px, package-only data.
    Variants: `tiny_cfg.layer` is the mapping it was resolved from; see helpers.tiny_variant."""
    from tests.helpers import tiny_config

    return tiny_config(tmp_path)
