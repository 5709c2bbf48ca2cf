"""Each plugin inside a stock avalanche.training.Naive on a two-experience tiny benchmark."""
import copy

import pytest
import torch
from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
from avalanche.benchmarks.scenarios.task_aware import with_task_labels
from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset
from avalanche.core import SupervisedPlugin
from avalanche.training import Naive

from benchmark.evaluation.multihead import MultiHeadClassifier
from strategies.l2sp import L2SPPlugin
from strategies.ldifs import LDIFSPlugin
from strategies.wise_ft import WiSEFTPlugin
from strategies import build_plugins
from strategies.ldifs import capture_slices, ldifs_distance
from strategies.wise_ft import interpolate_state
from tests.helpers import tiny_clip_vit


def tiny_benchmark(with_index=False, extra_field=False):
    """Two experiences of 12 random images; with_index: a third field holding each sample's
    position; extra_field: a third integer field that is not one (e.g. a stock dataset's metadata)."""
    g = torch.Generator().manual_seed(0)
    sets = []
    for t in range(2):
        x = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=g)
        y = torch.arange(12) % 3
        third = torch.arange(12) if with_index else torch.randperm(12, generator=g) if extra_field else None
        tensors = (x, y) if third is None else (x, y, third)
        sets.append(_make_taskaware_tensor_classification_dataset(*tensors, task_labels=t, targets=y))
    return with_classes_timeline(with_task_labels(benchmark_from_datasets(train=sets)))


class Recorder(SupervisedPlugin):
    """Captures, for the first batch of the second experience, what an independent computation needs."""

    def __init__(self):
        super().__init__()
        self.records = []

    def before_backward(self, strategy, **kwargs):  # runs after the plugins listed before it
        self.records.append({"x": strategy.mb_x.clone(), "loss": strategy.loss.detach().clone(),
                             "ce": strategy._criterion(strategy.mb_output, strategy.mb_y).detach(),
                             "state": copy.deepcopy(strategy.model.encoder.state_dict()),
                             "exp": strategy.experience.current_experience})


def model_with_heads(layers):
    torch.manual_seed(0)
    model = MultiHeadClassifier(tiny_clip_vit(layers=layers))
    for t in range(2):  # random heads, so that the encoder gets gradients from the first batch
        torch.nn.init.normal_(model.ensure_head(t, 3).linear.weight, std=3.0)
    return model


class IndexedNaive(Naive):
    """Stock Naive that names where each minibatch sample sits in its dataset (the dataset's third
    field holds it here), which lets LDIFS cache its reference per sample."""

    @property
    def mb_sample_index(self):
        return self.mbatch[2]


def train(plugins, with_index=False, epochs=1, extra_field=False):
    model = model_with_heads(4)
    recorder = Recorder()
    strategy = (IndexedNaive if with_index else Naive)(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                     criterion=torch.nn.CrossEntropyLoss(), train_mb_size=6, train_epochs=epochs,
                     plugins=[*plugins, recorder])
    encoders = []
    for exp in tiny_benchmark(with_index, extra_field).train_stream:
        encoders.append(copy.deepcopy(model.encoder.state_dict()))
        strategy.train(exp, eval_streams=[])
    return model, recorder.records, encoders


def test_ldifs_contribution_equals_independent_computation():
    plugin = LDIFSPlugin(alpha=10.0)
    model, records, encoders = train([plugin])
    first, rec = [r for r in records if r["exp"] == 1]  # two batches; the second one after an update
    assert (first["loss"] - first["ce"]).abs().item() < 1e-9  # reference = encoder before the task
    reference = tiny_clip_vit(layers=4).eval()
    reference.load_state_dict(encoders[1])  # "previous": the encoder before experience 1
    current = tiny_clip_vit(layers=4)
    current.load_state_dict(rec["state"])
    with torch.no_grad(), capture_slices(reference.slice_modules()) as ref_slices:
        reference(rec["x"])
    with torch.no_grad(), capture_slices(current.slice_modules()) as cur_slices:
        current(rec["x"])
    expected = 10.0 * ldifs_distance(cur_slices, ref_slices, "nlc", "official")
    assert (rec["loss"] - rec["ce"]).item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-7)
    assert expected.item() > 0


def test_l2sp_contribution_equals_weight_distance():
    model, records, encoders = train([L2SPPlugin(alpha=0.5)])
    rec = [r for r in records if r["exp"] == 1][-1]
    expected = 0.5 * sum(((rec["state"][k] - encoders[1][k]) ** 2).sum()
                         for k, _ in tiny_clip_vit(layers=4).named_parameters())
    assert (rec["loss"] - rec["ce"]).item() == pytest.approx(expected.item(), rel=1e-4)
    assert expected.item() > 0


class Snapshot(SupervisedPlugin):
    def __init__(self):
        super().__init__()
        self.after = []

    def after_training_exp(self, strategy, **kwargs):  # listed before WiSE-FT: sees the raw trained weights
        self.after.append(copy.deepcopy(strategy.model.state_dict()))


def test_wise_ft_interpolation_is_exact():
    snap = Snapshot()
    model = model_with_heads(2)
    before = copy.deepcopy(model.state_dict())
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                     criterion=torch.nn.CrossEntropyLoss(), train_mb_size=6, train_epochs=1,
                     plugins=[snap, WiSEFTPlugin(beta=0.25)])
    strategy.train(tiny_benchmark().train_stream[0], eval_streams=[])
    final = model.state_dict()
    changed = 0
    for k, v in final.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, 0.75 * before[k] + 0.25 * snap.after[0][k])
            changed += int(not torch.equal(before[k], snap.after[0][k]))
    assert changed > 0
    assert interpolate_state({"w": torch.tensor([0.0])}, {"w": torch.tensor([4.0])}, 0.25)["w"].item() == 1.0
    unchanged = torch.tensor([0.1, 0.7, 1e-3, 3.3])  # 0.2 x + 0.8 x is not x for every x in floating point
    assert (0.2 * unchanged + 0.8 * unchanged != unchanged).any()
    assert torch.equal(interpolate_state({"t": unchanged}, {"t": unchanged.clone()}, 0.8)["t"], unchanged)


def test_plugins_compose_in_one_strategy():
    plugins = build_plugins("ldifs+l2sp", {"ldifs": {"alpha": 1.0}, "l2sp": {"alpha": 0.1}})
    model, records, _ = train(plugins)
    assert isinstance(plugins[0], LDIFSPlugin) and isinstance(plugins[1], L2SPPlugin)
    expected = 1.0 * plugins[0].last_penalty + 0.1 * plugins[1].last_penalty
    # the recorder saw the last batch's sum; last_penalty is the last batch's too
    last = records[-1]
    assert (last["loss"] - last["ce"]).item() == pytest.approx(expected.item(), rel=1e-4)


@pytest.mark.parametrize("dtype,ram_mb,rtol,atol", [("float32", 4096, 1e-5, 1e-9), ("bfloat16", 4096, 2e-2, 1e-4),
                                                    ("auto", 0.0, 2e-3, 1e-5)])  # auto, 0 RAM: memory-mapped fp16
def test_ldifs_reference_cache_gives_same_losses_without_frozen_forwards(dtype, ram_mb, rtol, atol):
    cached = LDIFSPlugin(alpha=10.0, cache=True, cache_dtype=dtype, cache_budget_mb=ram_mb)
    _, with_cache, _ = train([cached], with_index=True, epochs=2)
    plain = LDIFSPlugin(alpha=10.0, cache=False)
    _, without, _ = train([plain], with_index=True, epochs=2)
    assert cached.reference_forwards == 0 and plain.reference_forwards == len(without) == 8
    for a, b in zip(with_cache, without):
        assert (a["loss"] - a["ce"]).item() == pytest.approx((b["loss"] - b["ce"]).item(), rel=rtol, abs=atol)
    assert (with_cache[-1]["loss"] - with_cache[-1]["ce"]).item() > 0


def test_ldifs_cache_over_budget_falls_back_to_on_the_fly():
    plugin = LDIFSPlugin(alpha=10.0, cache=True, cache_budget_mb=1e-6, cache_disk_mb=1e-6)
    train([plugin], with_index=True)
    assert plugin.reference_forwards == 4


def test_ldifs_with_a_stock_dataset_carrying_an_extra_integer_field_is_exact():
    """Stock Naive names no sample index, so an integer third field is never taken for one: the
    reference runs on the fly and the first batch of a task (weights = reference) has no penalty.
    (Keyed by field position, this gave 0.0073-0.0085.)"""
    plugin = LDIFSPlugin(alpha=10.0, cache=True)
    _, records, _ = train([plugin], extra_field=True)
    first = [r for r in records if r["exp"] == 1][0]
    assert abs((first["loss"] - first["ce"]).item()) < 1e-9
    assert plugin.reference_forwards == len(records) == 4


class _ToFloat(torch.nn.Module):
    def forward(self, x):
        return x.float() / 255


def _plain_cnn():
    torch.manual_seed(0)
    return torch.nn.Sequential(_ToFloat(), torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.ReLU(), torch.nn.Conv2d(4, 6, 3, stride=2),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(6, 3))


def _train_plain(plugin):
    model = _plain_cnn()
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
                     criterion=torch.nn.CrossEntropyLoss(), train_mb_size=6, train_epochs=1, plugins=[plugin])
    exp = tiny_benchmark().train_stream[0]
    return model, strategy, exp


def test_ldifs_checks_the_model_interface_before_the_first_step():
    model, strategy, exp = _train_plain(LDIFSPlugin(alpha=1.0))
    with pytest.raises(TypeError, match="model.encoder with slice_modules.*pass slice_modules"):
        strategy.train(exp, eval_streams=[])
    model, strategy, exp = _train_plain(LDIFSPlugin(alpha=1.0, slice_modules=["1", "nope"], layout="nchw"))
    with pytest.raises(TypeError, match=r"no submodule\(s\) \['nope'\]"):
        strategy.train(exp, eval_streams=[])
    with pytest.raises(ValueError, match="layout"):
        LDIFSPlugin(slice_modules=["1"])


def test_ldifs_with_slice_modules_given_directly_on_any_model():
    """A plain nn.Sequential: slices named as in named_modules(); the penalty at each step equals
    the formula on the current model's and the frozen pre-task copy's outputs of those modules."""
    plugin = LDIFSPlugin(alpha=1.0, slice_modules=["1", "3"], layout="nchw")
    model, strategy, exp = _train_plain(plugin)
    before = copy.deepcopy(model)
    seen = []

    class Check(SupervisedPlugin):
        def before_backward(self, strategy, **kwargs):
            cur, ref = copy.deepcopy(strategy.model), before
            with torch.no_grad(), capture_slices([cur[1], cur[3]]) as c, capture_slices([ref[1], ref[3]]) as r:
                cur(strategy.mb_x), ref(strategy.mb_x)
            seen.append((plugin.last_penalty.item(), ldifs_distance(c, r, "nchw").item()))

    strategy.plugins.append(Check())
    strategy.train(exp, eval_streams=[])
    assert len(seen) == 2 and seen[0][0] == pytest.approx(0.0, abs=1e-6)  # fp32 cancellation near 0
    assert seen[1][0] == pytest.approx(seen[1][1], rel=1e-5) and seen[1][1] > 0


def test_slice_store_picks_precision_then_memory_map_by_budget():
    from strategies import slice_store

    examples = [torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last), torch.randn(2, 5, 3)]
    per_sample_mb = (8 * 16 + 15) * 4 / 2**20
    ram = slice_store.allocate(1000, examples, "auto", ram_mb=1000 * per_sample_mb, disk_mb=0)
    assert [t.dtype for t in ram] == [torch.float32] * 2 and ram[0].is_contiguous(memory_format=torch.channels_last)
    half = slice_store.allocate(1000, examples, "auto", ram_mb=600 * per_sample_mb, disk_mb=0)
    assert [t.dtype for t in half] == [torch.float16] * 2  # float32 would not fit, float16 does
    mapped = slice_store.allocate(1000, examples, "auto", ram_mb=0, disk_mb=1000 * per_sample_mb)
    assert mapped[0].shape == (1000, 8, 4, 4) and mapped[0].dtype == torch.float16
    assert mapped[0].is_contiguous(memory_format=torch.channels_last)
    mapped[0][7] = examples[0][1].half()
    assert torch.equal(mapped[0][7], examples[0][1].half())
    assert slice_store.allocate(1000, examples, "auto", ram_mb=0, disk_mb=0) is None


def test_multihead_forward_returns_each_heads_own_classes():
    model = MultiHeadClassifier(tiny_clip_vit(layers=2)).eval()
    model.ensure_head(0, 10)
    torch.nn.init.normal_(model.ensure_head(1, 2).linear.weight)
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    assert model(x, torch.ones(4, dtype=torch.long)).shape == (4, 2)
    mixed = model(x, torch.tensor([0, 1, 0, 1]))
    assert mixed.shape == (4, 10)
    assert torch.all(mixed[1, 2:] == -1e4) and torch.allclose(mixed[1, :2], model(x[1:2], 1)[0])


class StateAtExpEnd(SupervisedPlugin):
    def __init__(self):
        super().__init__()
        self.states = []

    def after_training_exp(self, strategy, **kwargs):
        self.states.append(copy.deepcopy(strategy.model.state_dict()))


def _train_with(plugins, snap):
    model = model_with_heads(4)
    recorder = Recorder()
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                     criterion=torch.nn.CrossEntropyLoss(), train_mb_size=6, train_epochs=1,
                     plugins=[snap, *plugins, recorder])
    bench = tiny_benchmark()
    for exp in bench.train_stream:
        strategy.train(exp, eval_streams=[])
    return bench, recorder.records


@pytest.mark.parametrize("mode", [{"mode": "separate"}, {"mode": "online", "decay_factor": 0.5}])
def test_ewc_contribution_equals_fisher_weighted_distance(mode):
    """After the first task online EWC's importances are that task's alone: the same penalty."""
    from strategies.ewc import EWC

    snap = StateAtExpEnd()
    bench, records = _train_with([EWC(ewc_lambda=3.0, **mode)], snap)
    # independent Fisher diagonal: mean over the exp-0 batches (in order) of squared CE gradients
    model = model_with_heads(4)
    model.load_state_dict(snap.states[0])
    model.train()
    fisher = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    loader = torch.utils.data.DataLoader(bench.train_stream[0].dataset, batch_size=6)
    for x, y, t in loader:
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x, t), y).backward()
        for k, p in model.named_parameters():
            if p.grad is not None:
                fisher[k] += p.grad.detach() ** 2
    rec = [r for r in records if r["exp"] == 1][-1]
    current = {**{f"encoder.{k}": v for k, v in rec["state"].items()}}
    expected = sum((fisher[k] / len(loader) * (current[k] - snap.states[0][k]) ** 2).sum()
                   for k in fisher if k in current)
    assert (rec["loss"] - rec["ce"]).item() == pytest.approx(3.0 * expected.item(), rel=1e-3)
    assert expected.item() > 0


def test_lwf_contribution_equals_distillation_of_previous_head():
    from strategies.lwf import LwF

    snap = StateAtExpEnd()

    class FullState(Recorder):
        def before_backward(self, strategy, **kwargs):
            super().before_backward(strategy, **kwargs)
            self.records[-1]["model"] = copy.deepcopy(strategy.model.state_dict())

    model = model_with_heads(4)
    recorder = FullState()
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                     criterion=torch.nn.CrossEntropyLoss(), train_mb_size=6, train_epochs=1,
                     plugins=[snap, LwF(alpha=2.0, temperature=2.0), recorder])
    for exp in tiny_benchmark().train_stream:
        strategy.train(exp, eval_streams=[])
    rec = [r for r in recorder.records if r["exp"] == 1][-1]
    prev, cur = model_with_heads(4), model_with_heads(4)
    prev.load_state_dict(snap.states[0])
    cur.load_state_dict(rec["model"])
    prev.train(), cur.train()
    with torch.no_grad():
        p = torch.softmax(prev(rec["x"], 0) / 2.0, dim=1)
        log_q = torch.log_softmax(cur(rec["x"], 0) / 2.0, dim=1)
        kl = (p * (p.log() - log_q)).sum(dim=1).mean()
    assert (rec["loss"] - rec["ce"]).item() == pytest.approx(2.0 * kl.item(), rel=1e-3)
    assert kl.item() > 0
