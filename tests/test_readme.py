"""The README's first screen, as a newcomer reads it: the two commands come first, and the paper
protocol's size figures are the ones cfbench computes -- images and raw cache from the published
counts, the ImageNet probe's memory from its counted tensors, the hours' floor from counted FLOPs. (The training steps' 5.9 / 6.6 GiB
take a minute and a half on the protocol's ViT-B/32: BENCHMARKS.md has the command.)"""
import re
from pathlib import Path

import open_clip

import tasks
from benchmark.config import load_config
from benchmark.config.plan import make_plan
from benchmark.perf.projection.memory import GIB, probe_peak
from benchmark.perf.projection.rates import random_encoder
from benchmark.perf.projection import compute_floor, dataset_sizes
from tasks.base import published_counts

README = Path(__file__).resolve().parents[1] / "README.md"
FRONT = README.read_text().split("## What `make demo` does")[0]


def test_the_first_lines_are_the_two_commands():
    block = re.search(r"```bash\n(.*?)```", FRONT, re.S)
    assert block and block.start() < FRONT.index("**cfbench**")
    assert [line.split()[:2] for line in block.group(1).splitlines()] == [["make", "demo"], ["make", "test"]]


def test_the_ldifs_protocols_images_disk_and_probe_memory_are_what_cfbench_computes():
    cfg = load_config(None, {"protocol": "ldifs"})
    names = make_plan(cfg).evaluated
    images = {n: sum(published_counts(tasks.get_task(n)).values()) for n in names}
    raw_gb = {n: count * 3 * 224 * 224 / 1e9 for n, count in images.items()}
    front = " ".join(FRONT.split())
    assert f"reads {sum(images.values()) / 1e6:.2f} M images" in front
    assert f"{round(sum(raw_gb.values()))} GB as raw squares (ImageNet {round(raw_gb['imagenet'])} GB" in front
    features = dataset_sizes("imagenet", cfg).probe_train
    width = open_clip.get_model_config(cfg.model.name)["embed_dim"]
    probe = probe_peak(width, tasks.get_task("imagenet").num_classes, features, "cpu").at(features) / GIB
    assert f"{features / 1e6:.2f} M training features: {probe:.1f} GiB" in front
    assert "cfbench perf --projection ldifs" in front and "GPU hours have not been measured yet" in front


def test_the_ldifs_protocols_compute_floor_is_what_cfbench_counts():
    """The floor under its GPU hours: the FLOPs flops.py counts on the protocol's ViT-B/32 (random
    weights; 10 s here) at the datasheet peaks."""
    cfg = load_config(None, {"protocol": "ldifs"})
    floor = compute_floor(cfg, make_plan(cfg), random_encoder(cfg), ["ft", "ldifs"])
    hours = floor["hours"]
    front = " ".join(FRONT.split())
    assert (f"take {hours['ft']['H100 SXM']:.1f} h (FT) and {hours['ldifs']['H100 SXM']:.1f} h (LDIFS) at an H100 "
            f"SXM's fp32 datasheet peak, {hours['ft']['A100 SXM']:.1f} h and {hours['ldifs']['A100 SXM']:.1f} h at "
            "an A100's") in front
