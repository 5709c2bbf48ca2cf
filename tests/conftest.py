import os
import warnings

# The suite oversubscribes 2 cores on purpose (2 xdist workers, DDP ranks and CLI subprocesses beside
# them): OpenMP threads that spin while they wait took the cores from the processes doing the work
# (the ZSCL parity test beside 3 busy processes: 51 s spinning, 27 s passive). Set before torch loads
# its OpenMP runtime; the processes tests start inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

warnings.filterwarnings("ignore", message=".*QP solver.*")
from tests.helpers import THREADS, no_job_outlives_the_block  # noqa: E402

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


@pytest.fixture(autouse=True)
def no_cfbench_job_outlives_its_test():
    with no_job_outlives_the_block():
        yield


@pytest.fixture(autouse=True)
def own_folders_end_with_their_test():
    """A config's image_folders register tasks in this process; they do not outlive the test."""
    yield
    from tasks.registry import forget_image_folders

    forget_image_folders()


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


# `make test` runs 2 pytest-xdist workers, each file on one of them, handed out in collection order
# (--no-loadscope-reorder: xdist's default hands out the files with the most tests first, which left
# the 190 s ViT-B-32 file to start near the end): the longest files start first so that no worker is
# left alone with one at the end (measured 2026-12-06, each 25-190 s of a worker; the rest of the
# suite is spread behind them)
LONGEST_FIRST = ("test_real_configs_vit.py", "test_real_configs_demo.py", "test_distributed.py",
                 "test_launcher.py", "test_run_folders.py", "test_sweep.py", "test_work_once.py", "test_training.py",
                 "test_architecture.py", "test_models.py", "test_parity_zscl.py", "test_gpu_check.py")


def pytest_collection_modifyitems(items):
    order = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: order.get(item.path.name, len(order)))  # stable: files keep their order
