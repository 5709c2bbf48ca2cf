"""The training fast path: whole-minibatch gathers, same samples as Avalanche's dataset; precision."""
import pytest
import torch

import tasks
from tasks.loading import load_split
from benchmark.evaluation.matrix import Matrix
from benchmark.run.batches import TensorBatches
from benchmark.run.runner import _benchmark, run_strategy
from tests.helpers import tiny_config


def test_tensor_batches_cover_each_sample_once_with_avalanches_layout():
    split = load_split("digits", "train", 16, max_per_class=9)
    stream = _benchmark([split]).train_stream[0]
    torch.manual_seed(0)
    batches = list(TensorBatches(split, task=0, batch_size=16))
    assert len(batches) == len(TensorBatches(split, 0, 16)) == -(-len(split) // 16)
    seen = torch.cat([b[2] for b in batches])
    assert sorted(seen.tolist()) == list(range(len(split))) and not torch.equal(seen, torch.arange(len(split)))
    x, y, idx, t = batches[0]
    assert x.dtype == torch.uint8 and torch.equal(t, torch.zeros(len(idx), dtype=torch.long))
    for j in range(3):  # the sample Avalanche's dataset holds at that index is the one in the batch
        ax, ay, aidx, at = stream.dataset[int(idx[j])]
        assert torch.equal(ax, x[j]) and int(ay) == int(y[j]) and int(aidx) == int(idx[j]) and int(at) == 0
    torch.manual_seed(0)
    again = list(TensorBatches(split, task=0, batch_size=16))
    assert all(torch.equal(a[2], b[2]) for a, b in zip(batches, again))  # seeded: --resume stays exact


def test_bf16_autocast_run_trains_with_fp32_features(tiny_cfg, tmp_path):
    cfg = tiny_config(tmp_path, {"strategies": ["ldifs"], "tasks": ["digits"], "eval_only": ["faces"],
                                 "train": {"precision": "bf16"}, "figures": False})
    run = run_strategy(cfg, "ldifs", tmp_path / "bf16")
    lp = Matrix.load(run / "matrices/lp.csv")
    assert lp.rows == ["pretrained", "digits"] and all(0 <= v <= 100 for row in lp.values for v in row)
    assert lp.values[1][0] > 50  # digits is learned under bf16 autocast


def test_compiled_encoder_trains_like_eager_with_ldifs_hooks():
    import copy

    from benchmark.evaluation.multihead import MultiHeadClassifier
    from benchmark.run.runner import _silent_evaluator, make_optimizer
    from benchmark.run.training import FastNaive, configure_for_device
    from strategies.ldifs import LDIFSPlugin
    from tests.helpers import tiny_clip_vit

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    split = tasks.TensorSplit(torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8, generator=g),
                              torch.arange(24) % 3)
    # one block: a cold inductor cache (CI's) compiles every block's kernels again, 39 s with two, 21 s with one
    encoder = tiny_clip_vit(layers=1)
    penalties, weights = {}, {}
    for mode in ("eager", "compiled"):
        enc = copy.deepcopy(encoder)
        configure_for_device(enc, "cpu", "fp32", compile=mode == "compiled")
        model = MultiHeadClassifier(enc)
        model.ensure_head(0, 3)
        plugin = LDIFSPlugin(alpha=10.0)
        torch.manual_seed(1)
        FastNaive(model=model, optimizer=make_optimizer(model, "sgd", 0.5, 0.0), criterion=torch.nn.CrossEntropyLoss(),
                  train_mb_size=8, train_epochs=2, plugins=[plugin], evaluator=_silent_evaluator(),
                  train_splits=[split]).train(_benchmark([split]).train_stream[0], eval_streams=[])
        penalties[mode] = plugin.last_penalty.item()
        weights[mode] = torch.cat([p.detach().flatten() for p in model.parameters()])
        assert set(model.state_dict()) == set(MultiHeadClassifier(encoder).state_dict()) | {"heads.0.linear.weight",
                                                                                           "heads.0.linear.bias"}
    assert penalties["eager"] > 1e-6  # the hooks fed LDIFS real slices in both modes
    assert penalties["compiled"] == pytest.approx(penalties["eager"], rel=1e-2)
    assert torch.allclose(weights["compiled"], weights["eager"], atol=1e-4)


@pytest.mark.parametrize("once", [True, False])
def test_augment_once_gives_each_image_one_view_for_the_whole_task(once):
    """train.augment.once (MoE-Adapters' few-shot data: its augmented loader's first pass stacked and
    reused, finetune.py:39-64): every read of an image within a task is the same crop of it; without
    once each read is a fresh crop. A plugin records the augmented batches and their positions."""
    from avalanche.core import SupervisedPlugin

    from benchmark.evaluation.multihead import MultiHeadClassifier
    from benchmark.run.augment import RandomResizedCropBatch
    from benchmark.run.runner import _silent_evaluator, make_optimizer
    from benchmark.run.training import FastNaive
    from tests.helpers import tiny_clip_vit

    seen: dict[int, list[torch.Tensor]] = {}

    class Record(SupervisedPlugin):
        def before_forward(self, strategy, **kwargs):
            for i, x in zip(strategy.mb_sample_index.tolist(), strategy.mb_x):
                seen.setdefault(i, []).append(x.clone())

    g = torch.Generator().manual_seed(0)
    split = tasks.TensorSplit(torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=g),
                              torch.arange(12) % 3)
    model = MultiHeadClassifier(tiny_clip_vit(layers=1))
    model.ensure_head(0, 3)
    torch.manual_seed(1)
    FastNaive(model=model, optimizer=make_optimizer(model, "sgd", 0.0, 0.0), criterion=torch.nn.CrossEntropyLoss(),
              train_mb_size=5, train_epochs=3, plugins=[Record()], evaluator=_silent_evaluator(), train_splits=[split],
              train_augment=RandomResizedCropBatch((0.3, 1.0), once=once)
              ).train(_benchmark([split]).train_stream[0], eval_streams=[])
    assert sorted(seen) == list(range(12)) and all(len(reads) == 3 for reads in seen.values())
    same = [all(torch.equal(reads[0], r) for r in reads[1:]) for reads in seen.values()]
    assert all(same) if once else not any(same)
    assert not any(torch.equal(seen[i][0], split.x[i]) for i in seen)  # crops, not the images


def test_a_run_with_one_view_per_image_resumes_exactly(tmp_path):
    from tests.helpers import assert_resumed_run_is_the_uninterrupted_one

    cfg = tiny_config(tmp_path, {"eval_only": [], "model": {"image_size": 32}, "figures": False,
                                 "train": {"max_train_per_class": 6, "augment": {"kind": "rrc", "once": True}}})
    full = run_strategy(cfg, "ft", tmp_path / "full")
    part = run_strategy(cfg, "ft", tmp_path / "part", stop_after=1)
    assert "once: true" in (full / "config.yaml").read_text()
    assert_resumed_run_is_the_uninterrupted_one(full, part, "heads")
