"""The training fast path: whole-minibatch gathers, same samples as Avalanche's dataset; precision."""
import torch

import tasks
from benchmark.runner import _benchmark, run_strategy
from benchmark.store import Matrix
from benchmark.training import TensorBatches


def test_tensor_batches_cover_each_sample_once_with_avalanches_layout():
    split = tasks.load_split("digits", "train", 16, max_per_class=9)
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
    cfg = {**tiny_cfg, "strategies": ["ldifs"], "tasks": ["digits"], "eval_only": ["faces"],
           "train": {**tiny_cfg["train"], "precision": "bf16"}}
    run = run_strategy(cfg, "ldifs", tmp_path / "bf16")
    lp = Matrix.load(run / "matrices/lp.csv")
    assert lp.rows == ["pretrained", "digits"] and all(0 <= v <= 100 for row in lp.values for v in row)
    assert lp.values[1][0] > 50  # digits is learned under bf16 autocast
