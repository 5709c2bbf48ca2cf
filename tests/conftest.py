import os
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*QP solver.*")
# under pytest-xdist (make test: 2 workers) each worker takes one core
THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1)
torch.set_num_threads(THREADS)


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
    Variants: helpers.tiny_config(tmp_path, {changes})."""
    from tests.helpers import tiny_config

    return tiny_config(tmp_path)


TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 4, "width": 32, "head_width": 16, "patch_size": 8},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="session")
def tiny_clip_checkpoint(tmp_path_factory):
    """(path, model): a random-weight tiny CLIP registered as open_clip config `cfbench-tiny-vit` and
    saved as a local checkpoint (tests only; never a pretrained default)."""
    import json

    import open_clip

    folder = tmp_path_factory.mktemp("clip")
    (folder / "cfbench-tiny-vit.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(folder / "cfbench-tiny-vit.json")
    torch.manual_seed(0)
    model = open_clip.create_model("cfbench-tiny-vit")
    path = folder / "tiny.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    return str(path), model
