import numpy as np
import pytest
import torch

from strategies.ldifs import capture_slices, ldifs_distance
from tests.helpers import tiny_clip_rn, tiny_clip_vit


def official_formula(cur, ref, axis_norm):
    """Loop-level transcription: per sample, per slice, normalize along `axis_norm` of (L, C),
    squared difference, mean over C then over L; mean over slices, then over the batch."""
    n = cur[0].shape[0]
    total = 0.0
    for i in range(n):
        per_slice = []
        for c, r in zip(cur, ref):
            a, b = c[i].double().numpy(), r[i].double().numpy()
            a = a / (np.linalg.norm(a, axis=axis_norm, keepdims=True) + 1e-10)
            b = b / (np.linalg.norm(b, axis=axis_norm, keepdims=True) + 1e-10)
            per_slice.append(((a - b) ** 2).mean(axis=1).mean(axis=0))
        total += np.mean(per_slice)
    return total / n


@pytest.mark.parametrize("normalize,axis", [("official", 0), ("channel", 1)])
def test_ldifs_nlc_matches_loop_formula(normalize, axis):
    g = torch.Generator().manual_seed(0)
    cur = [torch.randn(3, 5, 7, generator=g) for _ in range(4)]
    ref = [torch.randn(3, 5, 7, generator=g) for _ in range(4)]
    got = ldifs_distance(cur, ref, "nlc", normalize).item()
    assert got == pytest.approx(official_formula(cur, ref, axis), rel=1e-5)


def test_ldifs_nchw_normalizes_channels_and_averages_c_h_w():
    g = torch.Generator().manual_seed(1)
    cur = [torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 6, 2, 2, generator=g)]
    ref = [torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 6, 2, 2, generator=g)]
    expected = 0.0
    for i in range(2):
        vals = []
        for c, r in zip(cur, ref):
            a, b = c[i].double().numpy(), r[i].double().numpy()
            a = a / (np.linalg.norm(a, axis=0, keepdims=True) + 1e-10)
            b = b / (np.linalg.norm(b, axis=0, keepdims=True) + 1e-10)
            vals.append(((a - b) ** 2).mean())
        expected += np.mean(vals) / 2
    assert ldifs_distance(cur, ref, "nchw").item() == pytest.approx(expected, rel=1e-5)


def _naive_distance(cur, ref, dim):
    """The formula written with autograd-visible ops: normalize both, square the difference, mean."""
    terms = []
    for a, r in zip(cur, ref):
        na = a / (a.norm(dim=dim, keepdim=True) + 1e-10)
        nr = r / (r.norm(dim=dim, keepdim=True) + 1e-10)
        terms.append(((na - nr) ** 2).mean())
    return torch.stack(terms).mean()


@pytest.mark.parametrize("layout,normalize,dim,shape", [("nchw", "official", 1, (3, 5, 4, 4)),
                                                         ("nlc", "official", 1, (3, 6, 5)),
                                                         ("nlc", "channel", 2, (3, 6, 5))])
def test_fused_ldifs_gradient_equals_autograd_of_the_formula(layout, normalize, dim, shape):
    g = torch.Generator().manual_seed(3)
    cur = [torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(2)]
    ref = [c.detach() + 0.3 * torch.randn(*shape, generator=g, dtype=torch.float64) for c in cur]
    with torch.no_grad():  # an all-zero position (ReLU-like activations have them) must not give NaN
        (cur[0][:, 0, :] if dim == 2 else cur[0][:, :, 0]).zero_()  # every entry along `dim`, one position
    leaves_fused = [c.clone().requires_grad_(True) for c in cur]
    leaves_naive = [c.clone().requires_grad_(True) for c in cur]
    fused = ldifs_distance(leaves_fused, ref, layout, normalize)
    naive = _naive_distance(leaves_naive, ref, dim)
    fused.backward()
    naive.backward()
    assert fused.item() == pytest.approx(naive.item(), rel=1e-9)
    for f, n in zip(leaves_fused, leaves_naive):
        assert torch.isfinite(f.grad).all()
        assert torch.allclose(f.grad, n.grad, rtol=1e-7, atol=1e-12)


def test_fused_ldifs_is_accurate_near_zero_distance_in_fp32():
    """When current == reference the value suffers fp32 cancellation only at the 1e-7 level."""
    g = torch.Generator().manual_seed(4)
    cur = [torch.randn(8, 32, 16, 16, generator=g)]
    assert abs(ldifs_distance(cur, [cur[0].clone()], "nchw").item()) < 1e-6


def test_vit_slices_are_ln_pre_and_blocks_at_quarters():
    model = tiny_clip_vit(layers=12).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad(), capture_slices(model.slice_modules()) as slices:
        model.encode_image(x)
    visual = model.clip.visual
    with torch.no_grad():
        ln_pre = visual._embeds(x)
        out = visual.forward_intermediates(x, indices=[2, 5, 8, 11], output_fmt="NLC", output_extra_tokens=True,
                                           intermediates_only=True)
    blocks = [torch.cat([p, t], dim=1) for p, t in zip(out["image_intermediates_prefix"], out["image_intermediates"])]
    assert len(slices) == 5 and model.slice_layout == "nlc"
    for got, want in zip(slices, [ln_pre, *blocks]):
        assert got.shape == (2, 17, 32)  # (N, L, C), batch first
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("layers,expected", [(12, 5), (24, 5), (2, 3)])
def test_vit_slice_count_for_any_depth(layers, expected):
    blocks = tiny_clip_vit(layers=layers).slice_modules()[1:]
    assert len(blocks) == expected - 1


def test_resnet_slices_are_stem_and_stages():
    model = tiny_clip_rn().eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad(), capture_slices(model.slice_modules()) as slices:
        model.encode_image(x)
    assert model.slice_layout == "nchw" and len(slices) == 5
    assert [s.ndim for s in slices] == [4] * 5
    loss = ldifs_distance(slices, [s + 0.1 * torch.randn_like(s) for s in slices], "nchw")
    assert loss.item() > 0


def test_ldifs_on_tiny_resnet_against_explicit_stage_outputs():
    """Slices of open_clip's ModifiedResNet: stem output and layer1..4, taken by hand."""
    torch.manual_seed(0)
    a, b = tiny_clip_rn().eval(), tiny_clip_rn().eval()
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.rand(3, 3, 32, 32)

    def by_hand(model):
        v = model.clip.visual
        h = v.stem(model.normalize(x))
        outs = [h]
        for layer in (v.layer1, v.layer2, v.layer3, v.layer4):
            h = layer(h)
            outs.append(h)
        return outs

    with torch.no_grad():
        sa, sb = by_hand(a), by_hand(b)
        with capture_slices(a.slice_modules()) as ha:
            a(x)
        with capture_slices(b.slice_modules()) as hb:
            b(x)
    expected = 0.0
    for i in range(3):
        vals = []
        for u, w in zip(sb, sa):
            un, wn = u[i] / (u[i].norm(dim=0, keepdim=True) + 1e-10), w[i] / (w[i].norm(dim=0, keepdim=True) + 1e-10)
            vals.append(((un - wn) ** 2).mean().item())
        expected += np.mean(vals) / 3
    assert ldifs_distance(hb, ha, "nchw").item() == pytest.approx(expected, rel=1e-5)
    assert expected > 0


def test_the_reference_encoder_is_the_image_tower_alone_and_checkpoints_as_one():
    """LDIFS reads the image tower's slices only: its frozen reference holds no text tower (its
    parameter count equals clip.visual's), gives the same slices, and a checkpoint restores it as one."""
    from avalanche.training import Naive

    from strategies.ldifs import LDIFSPlugin
    from strategies.checkpoint import export_state, import_state
    from tests.test_plugins import model_with_heads, tiny_benchmark

    model = model_with_heads(4)
    plugin = LDIFSPlugin(alpha=1.0, cache=False)
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), train_mb_size=6,
                     train_epochs=1, plugins=[plugin])
    strategy.train(tiny_benchmark().train_stream[0], eval_streams=[])
    reference, encoder = plugin.reference_encoder, model.encoder
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(reference) == count(encoder.clip.visual) < count(encoder)
    assert reference.clip.transformer is None and reference.tokenizer is None and not reference.has_text
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    encoder.eval()  # as the reference: the same attention kernel
    with torch.no_grad(), capture_slices(reference.slice_modules()) as ref, \
            capture_slices(encoder.slice_modules()) as cur:
        reference(x), encoder(x)
    assert all(torch.equal(a, b) for a, b in zip(ref, cur))  # lr 0: the encoder is still the reference
    saved = export_state(reference, model)
    assert saved["template"] == "image_tower" and not any(k.startswith("clip.transformer") for k in saved["state"])
    restored = import_state(saved, model)
    assert count(restored) == count(reference) and not restored.training
    assert all(torch.equal(restored.state_dict()[k], v) for k, v in reference.state_dict().items())
