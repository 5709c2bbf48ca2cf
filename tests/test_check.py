"""`run --check` finds every problem in one pass, each one line with its fix; pretrained weights are
looked up in the caches a run reads, never on the network (issue 34: `--check` said yes to a run
that then spent 75 s in hub retries and died)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub.constants
import pytest

from benchmark.cli import main
from benchmark.config.schema import ModelConfig
from benchmark.errors import CfbenchError
from tests.helpers import VIT_B_32_OPENAI_HUB, plant_hub_file

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """No weights cached anywhere: an empty hub cache and an empty home (open_clip's URL cache)."""
    hub = tmp_path / "hf"
    hub.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    return hub


def test_check_names_every_problem_each_with_its_fix(empty_caches, tmp_path, capsys):
    data = tmp_path / "data"
    rc = main(["run", "--protocol", "ldifs", "--tasks", "digits,cifar10", "--eval-only", "", "--data-root",
               str(data), "--out", str(tmp_path / "out"), "--check"])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and err[0] == "cfbench: error: 3 problems:", err
    assert len(err) == 4 and all(line.startswith("  - ") for line in err[1:]), err
    epochs, weights, cifar = err[1:]
    assert "train.epochs names no value for task 'digits'" in epochs and "--epochs N" in epochs
    assert "train.epochs='{digits: 3, default: 1}'" in epochs
    assert "ViT-B-32 'openai': weights are not cached" in weights
    assert "`cfbench data download --model ViT-B-32 --pretrained openai`" in weights
    assert "--pretrained FILE" in weights and "model.quick_gelu=true" in weights
    assert cifar.startswith("  - cifar10: missing") and f"`cfbench data download --tasks cifar10 --data-root {data}`" in cifar
    assert not (tmp_path / "out").exists()


def test_check_with_one_problem_prints_that_line_alone(empty_caches, tmp_path, capsys):
    rc = main(["run", "--protocol", "ldifs", "--tasks", "digits,faces", "--eval-only", "", "--epochs", "1", "--check"])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("cfbench: error: model ViT-B-32 'openai'"), err


@pytest.mark.parametrize("cache", ["hub", "url"])
def test_check_passes_once_the_weights_are_cached(empty_caches, tmp_path, capsys, cache):
    if cache == "hub":
        plant_hub_file(empty_caches, VIT_B_32_OPENAI_HUB, "open_clip_model.safetensors")
    else:  # open_clip's URL download lands in ~/.cache/clip/<basename of the URL>
        (tmp_path / "home" / ".cache" / "clip").mkdir(parents=True)
        (tmp_path / "home" / ".cache" / "clip" / "ViT-B-32.pt").write_bytes(b"weights")
    rc = main(["run", "--protocol", "ldifs", "--tasks", "digits,faces", "--eval-only", "", "--epochs", "1", "--check"])
    captured = capsys.readouterr()
    assert rc == 0 and "\nchecked: trains digits -> faces" in captured.out, captured.err


def test_a_run_without_cached_weights_fails_at_once_and_never_calls_the_hub(empty_caches, monkeypatch):
    import open_clip.pretrained

    from benchmark.models.factory import build_model

    def no_network(*args, **kwargs):
        raise AssertionError("a run called the hub")

    monkeypatch.setattr(open_clip.pretrained, "hf_hub_download", no_network)
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained_from_url", no_network)
    with pytest.raises(CfbenchError, match=r"ViT-B-32 'openai': weights are not cached.*--pretrained FILE"):
        build_model(ModelConfig(name="ViT-B-32", pretrained="openai", image_size=224))


def test_cached_weights_load_by_path_with_the_tags_preprocessing(empty_caches, monkeypatch):
    """The cached file is handed to open_clip as a path (no hub call), with the tag's mean / std and
    QuickGELU, which a path alone would not carry."""
    import open_clip

    from benchmark.models.clip import create_clip
    from tests.helpers import tiny_clip_vit

    planted = plant_hub_file(empty_caches, VIT_B_32_OPENAI_HUB, "open_clip_model.safetensors")
    calls = []

    def spy(name, **kwargs):
        calls.append((name, kwargs))
        return tiny_clip_vit().clip

    monkeypatch.setattr(open_clip, "create_model", spy)
    create_clip("ViT-B-32", "openai")
    (name, kwargs), = calls
    tag = open_clip.get_pretrained_cfg("ViT-B-32", "openai")
    assert name == "ViT-B-32" and kwargs["pretrained"] == str(planted) and kwargs["force_quick_gelu"] is True
    assert (kwargs["force_preprocess_cfg"]["mean"], kwargs["force_preprocess_cfg"]["std"]) == (tag["mean"], tag["std"])


def test_data_download_model_prints_a_cached_file_without_the_network(empty_caches, capsys):
    planted = plant_hub_file(empty_caches, VIT_B_32_OPENAI_HUB, "open_clip_model.safetensors")
    assert main(["data", "download", "--model", "ViT-B-32", "--pretrained", "openai"]) == 0
    assert capsys.readouterr().out.strip() == f"ViT-B-32 openai: {planted}"


def test_data_download_model_offline_is_one_line_and_quick(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hf"), "HOME": str(tmp_path)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "benchmark", "data", "download", "--model", "ViT-B-32",
                           "--pretrained", "laion2b_s34b_b79k"], cwd=REPO, env=env, capture_output=True, text=True)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("cfbench: error: model ViT-B-32 'laion2b_s34b_b79k': download failed"), lines
    assert time.perf_counter() - start < 60


def test_data_download_model_refuses_an_unknown_tag(capsys):
    assert main(["data", "download", "--model", "ViT-B-32", "--pretrained", "nope"]) == 2
    assert "no pretrained tag 'nope'" in capsys.readouterr().err


def test_a_failed_download_leaves_nothing_behind(tmp_path, monkeypatch, capsys):
    """torchvision's DTD download fails half-way (network gone after the folder was made)."""
    import tasks.vision

    class HalfDownload:
        def __init__(self, root, download, **kwargs):
            (Path(root) / "dtd" / "dtd").mkdir(parents=True)
            (Path(root) / "dtd" / "dtd-r1.0.1.tar.gz.part").write_bytes(b"partial")
            raise OSError("connection reset")

    monkeypatch.setattr(tasks.vision, "_dataset", lambda name: HalfDownload)
    root = tmp_path / "data"
    root.mkdir()
    (root / "mine.txt").write_text("the user's own file")
    assert main(["data", "download", "--tasks", "dtd", "--data-root", str(root)]) == 2
    err = capsys.readouterr().err
    assert "dtd: download failed (OSError: connection reset); nothing was kept" in err
    assert sorted(p.name for p in root.iterdir()) == ["mine.txt"]


def test_data_check_sizes_without_the_data_uses_published_counts_and_names_the_download(tmp_path, capsys):
    assert main(["data", "check", "--sizes", "--tasks", "cifar10,cars", "--data-root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    cifar = [line.split() for line in out.splitlines() if line.startswith("cifar10 ")]
    assert ["cifar10", "60000", f"{60000 * 3 * 224 * 224 / 1e9:.3f}", "-", "published", "counts", "(data", "not",
            "here)"] in cifar  # 50,000 train / 10,000 test as CIFAR-10 publishes them
    assert f"fetch it with `cfbench data download --tasks cifar10 --data-root {tmp_path}`" in out
    assert "--tasks cars" not in out  # no automatic download for Stanford Cars
    assert "(published counts: the sizes each source publishes" in out
