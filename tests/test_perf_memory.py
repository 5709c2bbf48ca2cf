"""benchmark/perf/projection/memory.py: the peak tensor memory counted on a CPU equals a hand count of the
storages made and freed, and its linear extension recovers a known fixed + per-item peak."""
import gc

import pytest
import torch

from benchmark.perf.projection.memory import PeakTensorBytes, linear_peak, peak_bytes

MB = 1000 * 1000  # 250,000 float32


def test_counts_the_storages_made_inside_and_frees_them():
    outside = torch.zeros(250_000)
    with PeakTensorBytes() as counted:
        a = torch.zeros(250_000)           # 1 MB
        b = a + 1                          # 1 MB: 2 live
        view = b[:10].view(2, 5)           # a view: nothing new
        a.add_(1)                          # in place: nothing new
        outside.mul_(2)                    # made before the block: never counted
        outside_view = outside[:100]
        del b, view
        gc.collect()                       # b's storage freed: 1 live
        c = torch.ones(500_000)            # 2 MB: 3 live, the peak
        del c
        gc.collect()
        d = torch.empty(0)
        d.resize_(125_000)                 # grown in place: 0.5 MB more
    assert counted.peak == 3 * MB
    assert counted.live == MB + MB // 2
    assert a.sum() == 250_000 and outside_view.shape == (100,)


def test_counts_a_training_step_at_least_as_its_parameters_gradients_and_states():
    """A Linear layer made inside the block, one AdamW step: its weights, their gradients and AdamW's
    two moments are alive together at the step, so the peak is at least four times the weights."""
    def step():
        layer = torch.nn.Linear(512, 256)
        optimizer = torch.optim.AdamW(layer.parameters())
        layer(torch.randn(8, 512)).square().mean().backward()
        optimizer.step()
    weights = (512 * 256 + 256) * 4
    peak = peak_bytes(step, "cpu")
    assert 4 * weights <= peak <= 6 * weights


def test_linear_extension_recovers_a_fixed_and_a_per_item_peak():
    def work(count: int) -> None:
        fixed = torch.zeros(1000)                       # 4,000 bytes whatever the count
        per_item = torch.zeros(count, 250)              # 1,000 bytes an item
        del per_item
        return fixed
    peak = linear_peak(work, (4, 16), "cpu")
    assert (peak.fixed, peak.per_item, peak.measured_at) == (4000, 1000, (4, 16))
    assert peak.at(1_000_000) == 4000 + 1_000_000 * 1000


def test_a_peak_that_does_not_grow_extends_flat():
    peak = linear_peak(lambda count: torch.zeros(1000), (2, 4), "cpu")
    assert peak.per_item == 0 and peak.at(10 ** 6) == pytest.approx(4000)


def test_the_official_probe_holds_one_copy_of_its_features():
    """_fit_torch_lr copies the features to the device once and normalizes that copy in place (float64
    features make the copy on a CPU too): wide features, two classes, so the copies dominate."""
    from benchmark.evaluation.probe import _fit_torch_lr
    n, width = 2000, 512
    features, labels = torch.randn(n, width, dtype=torch.float64), torch.arange(n) % 2
    before = features.clone()
    peak = peak_bytes(lambda: _fit_torch_lr(features, labels, 2, 0.1, 2, "cpu"), "cpu")
    one_copy = n * width * 4
    assert one_copy <= peak < 1.5 * one_copy
    assert torch.equal(features, before)  # the caller's features untouched
    same_device = features.float()  # float32 on the CPU: `.to` alone would hand back the caller's tensor
    kept = same_device.clone()
    _fit_torch_lr(same_device, labels, 2, 0.1, 1, "cpu")
    assert torch.equal(same_device, kept)
