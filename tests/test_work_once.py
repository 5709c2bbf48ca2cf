"""Under DDP the work whose result every rank needs is done once per run, not once per rank: the
probe fits of an evaluation round, the LP-init fit, LDIFS's reference cache and ZSCL's teacher
features (images and texts). Counted in 2 gloo processes against one process, which must also
get the same results."""
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import benchmark.evaluation.evaluate as evaluate
import benchmark.run.runner as runner
from benchmark.config import EvalConfig
from benchmark.evaluation.evaluate import EvalDataset, evaluate_round
from benchmark.evaluation.multihead import MultiHeadClassifier
from strategies.ldifs import LDIFSPlugin
from strategies.zscl import ZSCLPlugin
from tasks import TensorSplit
from tests.helpers import tiny_clip_vit, tiny_config


class _Counted:
    """Wraps a function and counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


class _Strategy:
    """What LDIFS reads of a training strategy before a task."""

    def __init__(self, model, images: torch.Tensor):
        labels = torch.arange(len(images)) % 3
        self.model, self.device, self.train_mb_size, self.train_augment = model, "cpu", 8, None
        self.experience = SimpleNamespace(dataset=torch.utils.data.TensorDataset(images, labels))

    @property
    def mb_sample_index(self) -> torch.Tensor:  # the property LDIFS's cache needs to exist
        raise AssertionError("not read before training")


def _split(n: int, classes: int, seed: int) -> TensorSplit:
    g = torch.Generator().manual_seed(seed)
    return TensorSplit(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                       torch.arange(n) % classes)


def _work(tmp: str) -> dict:
    """Every piece of shared work on a tiny CLIP, with the calls and encoded samples of this process."""
    torch.set_num_threads(1)
    fits = {name: _Counted(getattr(evaluate, name)) for name in ("fit_probe", "select_official_lr")}
    for name, counted in fits.items():
        setattr(evaluate, name, counted)
    lp_init = runner.lp_init_weights = _Counted(runner.lp_init_weights)
    encoder = tiny_clip_vit(4)
    model = MultiHeadClassifier(encoder)
    datasets = [EvalDataset(f"d{i}", ["a", "b", "c"], ["a photo of a {}."], _split(600, 3, i), _split(30, 3, 10 + i),
                            _split(300, 3, 20 + i)) for i in range(3)]
    cells = {}
    for probe in ("sklearn", "official"):
        result = evaluate_round(model, datasets, {}, EvalConfig(probe=probe, probe_iterations=20, batch_size=256),
                                kinds=["lp"], keep=["d0"])
        cells[probe] = result.cells["lp"]
    kept = result.kept["d0"]
    head = runner._lp_init_head(tiny_config(Path(tmp)).replace(eval=EvalConfig(probe="official", probe_iterations=20)),
                                model, "digits", kept, "cpu")

    ldifs = LDIFSPlugin(alpha=1.0)
    ldifs.before_training_exp(_Strategy(model, _split(700, 3, 5).x))
    cache = [c.clone() for c in ldifs._cached]
    ldifs.after_training_exp(None)
    texts = torch.randint(1, 49000, (600, 77), generator=torch.Generator().manual_seed(7))  # token sequences
    zscl = ZSCLPlugin(_split(50, 3, 6).x, texts, weight_ensemble=False)
    zscl.teacher = encoder
    zscl._text_embeddings = zscl._encode_texts("cpu")
    first = zscl._teacher_image_features(torch.arange(0, 40, 3), "cpu")
    again = zscl._teacher_image_features(torch.arange(0, 50, 2), "cpu")
    return {"fits": {name: c.calls for name, c in fits.items()}, "lp_init": lp_init.calls, "cells": cells,
            "head": head, "ldifs_samples": ldifs.cached_samples, "ldifs_cache": cache, "teacher_images": zscl.teacher_images,
            "features": (first, again), "texts": zscl._text_embeddings}


def _rank(rank: int, tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=2)
    try:
        torch.save(_work(tmp), f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_shared_work_is_done_once_per_run_over_two_ranks(tmp_path):
    mp.start_processes(_rank, args=(str(tmp_path),), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    saved = {name: getattr(evaluate, name) for name in ("fit_probe", "select_official_lr")}
    lp_init, threads = runner.lp_init_weights, torch.get_num_threads()
    try:
        one = _work(str(tmp_path))
    finally:
        for name, fn in saved.items():
            setattr(evaluate, name, fn)
        runner.lp_init_weights = lp_init
        torch.set_num_threads(threads)
    # one process: 3 datasets x (sklearn, official), 1 LP-init fit, 700 reference samples + the
    # first one LDIFS encodes to size its cache, 14 + 18 teacher images (the second batch's 7
    # already encoded ones are not encoded again)
    assert one["fits"] == {"fit_probe": 3, "select_official_lr": 3} and one["lp_init"] == 1
    assert one["teacher_images"] == 14 + 18 and one["ldifs_samples"] == 700
    for counted in ("fit_probe", "select_official_lr"):
        assert sum(r["fits"][counted] for r in ranks) == one["fits"][counted]
        assert all(r["fits"][counted] > 0 for r in ranks)  # shared out, not all on one rank
    assert [r["lp_init"] for r in ranks] == [1, 0]
    for counted in ("ldifs_samples", "teacher_images"):
        assert sum(r[counted] for r in ranks) == one[counted] and all(r[counted] > 0 for r in ranks)
    for r in ranks:  # every rank has what one process has
        assert r["cells"] == one["cells"]
        assert all(torch.equal(r["head"][k], one["head"][k]) for k in ("weight", "bias"))
        assert all(torch.equal(a, b) for a, b in zip(r["ldifs_cache"], one["ldifs_cache"]))  # the same chunks
        assert torch.equal(r["texts"], one["texts"])  # the same chunks of 256, encoded on one rank each
        for mine, whole in zip(r["features"], one["features"]):  # other batches: rounding of the matmuls
            torch.testing.assert_close(mine, whole, rtol=1e-5, atol=1e-6)
