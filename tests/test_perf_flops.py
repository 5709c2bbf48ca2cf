"""benchmark/perf/projection/flops.py: the counted FLOPs equal hand counts (a linear layer, an attention
in its inference fast path, the official probe's step), LDIFS's step costs FT's plus one forward of
its reference, and the floor divides by the datasheet peak."""
import pytest
import torch

from benchmark.config import load_config
from benchmark.models.factory import create_model
from benchmark.perf.projection.flops import DATASHEET_TFLOPS, counted_flops, floor_hours, flop_rates


def test_a_linear_layer_costs_two_flops_per_multiply_add():
    layer = torch.nn.Linear(64, 32)
    assert counted_flops(lambda: layer(torch.randn(5, 64))) == 2 * 5 * 64 * 32


def test_attention_is_counted_in_its_inference_fast_path_too():
    """nn.MultiheadAttention without grad in eval mode runs one fused op the counter cannot see."""
    e, heads, length, batch = 32, 4, 10, 3
    attention = torch.nn.MultiheadAttention(e, heads, batch_first=True).eval()
    x = torch.randn(batch, length, e)
    projections = 4 * 2 * batch * length * e * e       # q, k, v and out
    scores = 2 * 2 * batch * length * length * e       # q k^T and the weights times v, over all heads
    with torch.no_grad():
        assert counted_flops(lambda: attention(x, x, x, need_weights=False)) == projections + scores
    assert torch.backends.mha.get_fastpath_enabled()  # turned back on


@pytest.fixture(scope="module")
def tiny_rates(tiny_clip_checkpoint):
    cfg = load_config(None, {"protocol": "ldifs", "model": {"image_size": 32}})
    encoder = create_model("cfbench-tiny-vit", None)  # registered by the tiny_clip_checkpoint fixture
    return encoder, flop_rates(cfg, encoder, ["ft", "ldifs"], 10, {"cars": 196, "mnist": 10})


def test_ldifs_costs_a_reference_forward_more_than_ft_and_the_probe_four_width_classes(tiny_rates):
    encoder, rates = tiny_rates
    forward = 1 / rates.extract
    ft, ldifs = 1 / rates.train["ft"], 1 / rates.train["ldifs"]
    assert ft > 2 * forward  # a backward costs about twice its forward
    assert ldifs - ft == pytest.approx(forward, rel=0.02)  # the reference's forward, no backward
    # a full-batch step per feature: the logits (2 w k) and the weights' gradient (2 w k)
    assert rates.probe == {"cars": 4 * encoder.feature_dim * 196, "mnist": 4 * encoder.feature_dim * 10}


def test_the_floor_is_the_flops_at_the_datasheet_peak():
    hours = floor_hours(67e12 * 3600 * 2, "fp32")
    assert hours["H100 SXM"] == pytest.approx(2) and hours["A100 SXM"] == pytest.approx(2 * 67 / 19.5)
    assert floor_hours(1e15, "bf16")["H100 SXM"] == pytest.approx(1e15 / (DATASHEET_TFLOPS["H100 SXM"]["bf16"]
                                                                            * 1e12) / 3600)
