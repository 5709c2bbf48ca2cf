import numpy as np
import torch

from benchmark.evaluation.evaluate import extract_features
from benchmark.evaluation.probe import accuracy, fit_probe
from benchmark.models.efficientnet import EfficientNetLite0
from benchmark.models.factory import create_model
from tasks.loading import load_split


def test_packaged_weights_recognise_a_real_photo():
    """scikit-image's `chelsea` is a cat photo: ImageNet classes 281-285 are the domestic cats."""
    import skimage.data
    import timm
    import torch.nn.functional as F

    from benchmark.models.efficientnet import load_packaged_state, packaged_weights_path

    net = timm.create_model("efficientnet_lite0", pretrained=False)
    load_packaged_state(net, packaged_weights_path())
    img = torch.from_numpy(skimage.data.chelsea()).permute(2, 0, 1)[None].float() / 255
    img = F.interpolate(img, size=224, mode="bilinear", antialias=True)
    with torch.no_grad():
        top = net.eval()((img - 0.5) / 0.5).softmax(-1)[0].topk(3).indices.tolist()
    assert set(top) <= {281, 282, 283, 284, 285}


def test_a_weights_file_is_read_once_per_process_until_it_changes(tmp_path):
    """The encoder of every strategy of an invocation loads the same file: read once, and read again
    when it is rewritten (same size, new values)."""
    import os

    from benchmark.models.efficientnet import _read_weights, packaged_weights_path

    path = tmp_path / "weights.pt"
    torch.save(torch.load(packaged_weights_path(), weights_only=True), path)
    first = EfficientNetLite0(pretrained=str(path), image_size=32)
    hits = _read_weights.cache_info().hits
    again = EfficientNetLite0(pretrained=str(path), image_size=32)
    assert _read_weights.cache_info().hits == hits + 1
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    changed = {k: v + 1 if v.is_floating_point() else v for k, v in torch.load(path, weights_only=True).items()}
    torch.save(changed, path)
    os.utime(path, ns=(1, 1))  # a new modification time even within the clock's resolution
    rewritten = EfficientNetLite0(pretrained=str(path), image_size=32)
    assert torch.equal(rewritten.net.conv_stem.weight, first.net.conv_stem.weight + 1)


def _probe_accuracy(encoder, name):
    train = load_split(name, "train", 64, max_per_class=60)
    test = load_split(name, "test", 64, max_per_class=30)
    probe = fit_probe(extract_features(encoder, train.x), train.y, int(train.y.max()) + 1)
    return accuracy(probe.logits(extract_features(encoder, test.x)), test.y)


def test_pretrained_encoder_probes_far_better_than_random_weights():
    torch.manual_seed(0)
    pretrained = create_model("efficientnet_lite0", "package", 64).eval()
    random_init = EfficientNetLite0(pretrained=None, image_size=64).eval()  # tests only
    good, bad = _probe_accuracy(pretrained, "photo_patches"), _probe_accuracy(random_init, "photo_patches")
    assert good > bad + 20, (good, bad)


def test_bn_statistics_stay_frozen_in_train_mode():
    model = create_model("efficientnet_lite0", "package", 32)
    model.train()
    before = model.net.bn1.running_mean.clone()
    model(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8))
    assert torch.equal(before, model.net.bn1.running_mean)
    assert model.training and not model.net.bn1.training


def test_uint8_input_is_normalized_to_minus_one_one():
    model = create_model("efficientnet_lite0", "package", 32)
    x = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 1, 1)
    out = model.normalize(x)
    assert np.allclose(out[0].numpy(), -1) and np.allclose(out[1].numpy(), 1)
