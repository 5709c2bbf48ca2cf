"""LoRA (strategies/lora.py, benchmark/models/adapters/lora.py): each layer equals its equation and
peft's layer on the same factors; installing it changes no output until it trains, freezes all but
A and B (the text tower and BatchNorm statistics too), and a merge folds B A into the weights.
The DDP, --resume and compact matrix runs `lora+ldifs` (tests/test_real_configs_demo.py)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import strategies
from benchmark.models.adapters import is_adapter_parameter
from benchmark.models.adapters.lora import LoraConv2d, LoraLinear, LoraMultiheadAttention, install_lora, lora_layers
from benchmark.models.efficientnet import EfficientNetLite0
from benchmark.run.runner import run_strategy
from strategies.context import BuildContext
from strategies.lora import install, targets_for
from tests.helpers import tiny_clip_vit, tiny_config


def _random_factors(layer) -> None:
    """B non-zero, so the update shows."""
    g = torch.Generator().manual_seed(1)
    for a, b in layer.factors():
        with torch.no_grad():
            b.copy_(torch.randn(b.shape, generator=g) * 0.1)


def test_linear_and_conv_layers_equal_their_equation_and_peft():
    """Against peft when it is installed (`pip install peft==0.21.2`; `make test` leaves it out: the
    transformers it pulls in is imported by torchmetrics in every process that imports Avalanche, 0.8 s
    each). Measured with peft 0.21.2 (2026-12-07): equal."""
    torch.manual_seed(0)
    linear, conv = nn.Linear(6, 5), nn.Conv2d(3, 4, 3, stride=2, padding=1)
    ours_linear, ours_conv = LoraLinear(copy.deepcopy(linear), 2, 6.0), LoraConv2d(copy.deepcopy(conv), 2, 6.0)
    for layer in (ours_linear, ours_conv):
        layer.reset_adapter(torch.Generator().manual_seed(0))
        _random_factors(layer)
    x, image = torch.randn(7, 6), torch.randn(2, 3, 9, 9)
    scale = 6.0 / 2
    expected = linear(x) + scale * x @ ours_linear.lora_A.T @ ours_linear.lora_B.T
    torch.testing.assert_close(ours_linear(x), expected)
    merged_conv = F.conv2d(image, conv.weight + scale * torch.einsum("or,rikl->oikl", ours_conv.lora_B[:, :, 0, 0],
                                                                     ours_conv.lora_A), conv.bias, 2, 1)
    torch.testing.assert_close(ours_conv(image), merged_conv, rtol=1e-5, atol=1e-5)
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        return

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.conv = copy.deepcopy(linear), copy.deepcopy(conv)

    theirs = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=6, target_modules=["fc", "conv"]), Pair())
    with torch.no_grad():
        theirs.fc.lora_A["default"].weight.copy_(ours_linear.lora_A)
        theirs.fc.lora_B["default"].weight.copy_(ours_linear.lora_B)
        theirs.conv.lora_A["default"].weight.copy_(ours_conv.lora_A)
        theirs.conv.lora_B["default"].weight.copy_(ours_conv.lora_B)
    torch.testing.assert_close(ours_linear(x), theirs.fc(x), rtol=0, atol=0)
    torch.testing.assert_close(ours_conv(image), theirs.conv(image), rtol=1e-6, atol=1e-6)


def test_attention_layer_is_attention_with_updated_weights_and_leaves_the_frozen_ones_alone():
    torch.manual_seed(0)
    base = nn.MultiheadAttention(8, 2, batch_first=True)
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    layer = LoraMultiheadAttention(base, 2, 4.0)
    layer.reset_adapter(torch.Generator().manual_seed(0))
    _random_factors(layer)
    reference = copy.deepcopy(base)
    with torch.no_grad():
        reference.in_proj_weight += 2.0 * layer.lora_B @ layer.lora_A
        reference.out_proj.weight += 2.0 * layer.lora_B_out @ layer.lora_A_out
    x = torch.randn(3, 5, 8)
    mask = torch.triu(torch.full((5, 5), float("-inf")), 1)
    out, _ = layer(x, x, x, need_weights=False, attn_mask=mask)
    torch.testing.assert_close(out, reference(x, x, x, need_weights=False, attn_mask=mask)[0])
    out.sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_B_out.grad is not None
    assert all(torch.equal(v, frozen[k]) for k, v in base.state_dict().items())
    assert layer.in_proj_weight is base.in_proj_weight  # open_clip reads these through the wrapper


def test_merge_folds_the_update_into_the_weights_and_starts_a_fresh_adapter():
    torch.manual_seed(0)
    for layer, x in ((LoraLinear(nn.Linear(6, 5), 2, 4.0), torch.randn(4, 6)),
                     (LoraConv2d(nn.Conv2d(3, 4, 3, padding=1), 2, 4.0), torch.randn(2, 3, 6, 6)),
                     (LoraMultiheadAttention(nn.MultiheadAttention(8, 2), 2, 4.0), torch.randn(5, 2, 8))):
        layer.reset_adapter(torch.Generator().manual_seed(0))
        _random_factors(layer)
        run = (lambda m: m(x, x, x)[0]) if isinstance(layer, LoraMultiheadAttention) else (lambda m: m(x))
        before, weights = run(layer), [w.clone() for w in layer.merged_weights()]
        layer.merge(torch.Generator().manual_seed(5))
        torch.testing.assert_close(run(layer), before, rtol=1e-5, atol=1e-6)
        assert all(not torch.equal(w, old) for w, old in zip(layer.merged_weights(), weights))
        assert all(not b.any() and a.abs().sum() > 0 for a, b in layer.factors())


def test_installed_in_a_clip_changes_nothing_until_it_trains_and_only_its_factors_train():
    encoder = tiny_clip_vit(layers=4)
    x = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    tokens = encoder.tokenizer(["a photo of a cat"])
    before_image, before_text = encoder(x), encoder.encode_text(tokens)
    install(encoder, BuildContext(seed=3), rank=2, alpha=4.0, dropout=0.0, target_modules="auto", towers="auto",
            merge=False)
    names = [n for n, _ in encoder.named_modules() if isinstance(_, (LoraLinear, LoraMultiheadAttention))]
    assert len(names) == 4 * 3 and all(n.startswith("clip.visual.transformer.resblocks.") for n in names)
    assert torch.equal(encoder(x), before_image) and torch.equal(encoder.encode_text(tokens), before_text)
    trainable = [n for n, p in encoder.named_parameters() if p.requires_grad]
    assert trainable and all(is_adapter_parameter(n) for n in trainable)
    encoder.set_text_trainable(True)  # a text head trains the text tower: the base of it stays frozen
    assert all(is_adapter_parameter(n) for n, p in encoder.named_parameters() if p.requires_grad)
    # towers auto follows the head: with a text head the text tower's blocks are adapted too
    both = targets_for(tiny_clip_vit(layers=4), "auto", "auto", train_head="text")
    assert sum(n.startswith("clip.transformer.") for n in both) == 1 * 3
    with pytest.raises(ValueError, match="matches no module"):
        targets_for(encoder, "image", r"clip\.nothing.*")
    again = tiny_clip_vit(layers=4)
    install(again, BuildContext(seed=3), 2, 4.0, 0.0, "auto", "auto", False)
    assert all(torch.equal(a.lora_A, b.lora_A) for a, b in zip(lora_layers(encoder), lora_layers(again)))


def test_efficientnet_targets_skip_depthwise_convolutions_and_batchnorm_stays_frozen():
    encoder = EfficientNetLite0(pretrained=None, image_size=32, freeze_bn=False)
    names = targets_for(encoder, "auto", "auto")
    convs = {n: m for n, m in encoder.named_modules() if isinstance(m, nn.Conv2d)}
    assert names and all(convs[n].groups == 1 for n in names)
    assert any(m.groups > 1 for m in convs.values())
    install_lora(encoder, names, 4, 8.0)
    encoder.adapters_only = True
    encoder.train()
    assert all(not m.training for m in encoder.modules() if isinstance(m, nn.BatchNorm2d))


def test_lora_combines_with_the_penalties_and_refuses_a_second_adapter():
    assert [s.name for s in strategies.parse_strategy("lora+ldifs")] == ["lora", "ldifs"]
    strategies.parse_strategy("lora+l2sp+wise-ft")
    spec = strategies.STRATEGIES["lora"]
    spec_b = strategies.StrategySpec("other-adapter", "test", replaces=("parameters",))
    strategies.register_strategy(spec_b)
    try:
        with pytest.raises(strategies.CfbenchError, match="both replace the training parameters"):
            strategies.parse_strategy("lora+other-adapter")
    finally:
        del strategies.STRATEGIES["other-adapter"]
    with pytest.raises(strategies.CfbenchError, match="rank must be >= 1"):
        strategies.check_params("lora", {"lora": {"rank": 0}})
    assert spec.adapts == "lora:install"


def test_lora_l2sp_penalises_the_factors_alone_and_the_encoder_base_never_moves(tmp_path):
    """lora+l2sp over two tasks of the tiny demo run (merge on): the frozen weights change only by
    the merges, each equal to the sum of the tasks' scale * B A."""
    cfg = tiny_config(tmp_path, {"strategy_params": {"lora": {"merge": True}, "l2sp": {"reference": "pretrained"}},
                                 "eval_only": [], "figures": False})
    run = run_strategy(cfg.replace(strategies=["lora+l2sp"]), "lora+l2sp", tmp_path / "run")
    state = torch.load(run / "checkpoints/state.pt", weights_only=True)
    assert any("lora_A" in k for k in state["model"]) and not any(state["model"][k].any()
                                                                  for k in state["model"] if k.endswith("lora_B"))
    l2sp = state["plugins"][1]["reference_params"]["items"]
    assert l2sp and all(is_adapter_parameter(name) for name, _ in l2sp)
    fresh = EfficientNetLite0(image_size=64).state_dict()
    trained = {k.removeprefix("encoder."): v for k, v in state["model"].items() if k.startswith("encoder.")}
    moved = [k for k, v in fresh.items() if not torch.equal(v, trained[k] if k in trained else trained[_wrapped(k)])]
    assert moved and all(_wrapped(k) in trained and k.endswith("weight") for k in moved)
    assert "LoRA rank 8" in (run / "log.txt").read_text()


def _wrapped(key: str) -> str:
    """The key of a wrapped layer's frozen tensor (`.base.` inserted before the last field)."""
    module, _, field = key.rpartition(".")
    return f"{module}.base.{field}"
