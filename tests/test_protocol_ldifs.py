"""The `ldifs` protocol against the official LDIFS code (omegafragger/ldifs_code, commit c7e82a4).

Each `official_*` function below is a transcription of the official code (file:line in its
docstring), run beside cfbench's implementation on the same inputs.
"""
import math

import huggingface_hub.constants
import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
import torchvision
import yaml

import tasks
from tasks.loading import load_split
from benchmark.cli import main
from benchmark.config import EvalConfig
from benchmark.config.templates import load_template_set, task_templates
from benchmark.evaluation.evaluate import EvalDataset, ZeroShotClassifier, evaluate_round
from benchmark.evaluation.matrix import Matrix
from benchmark.evaluation.multihead import MultiHeadClassifier
from benchmark.evaluation.probe import fit_official_probe
from benchmark.models.factory import create_model
from benchmark.models.clip import wants_quick_gelu
from benchmark.run.augment import RandomResizedCropBatch
from benchmark.run.runner import _init_head, run_strategy
from benchmark.run.schedule import GradClipPlugin, WarmupCosinePlugin
from tests.helpers import THREADS, VIT_B_32_OPENAI_HUB, plant_hub_file, tiny_config

from . import dataset_fixtures as fx

# ---- transcriptions of the official code ------------------------------------------------------

class OfficialClassificationHead(torch.nn.Linear):
    """model/modeling.py:153-168."""

    def __init__(self, normalize, weights, biases=None):
        output_size, input_size = weights.shape
        super().__init__(input_size, output_size)
        self.normalize = normalize
        self.weight = torch.nn.Parameter(weights.clone())
        self.bias = torch.nn.Parameter(biases.clone() if biases is not None else torch.zeros_like(self.bias))

    def forward(self, inputs):
        if self.normalize:
            inputs = inputs / inputs.norm(dim=-1, keepdim=True)
        return super().forward(inputs)


def official_fit_logistic_regression(train_embeddings, train_labels, max_epochs=1000, lr=1.0):
    """model/logistic_regression.py:10-36."""
    num_labels = torch.unique(train_labels).shape[0]
    pseudo = torch.nn.Linear(train_embeddings.shape[1], num_labels)
    model = OfficialClassificationHead(True, pseudo.weight, pseudo.bias)
    optimizer = torch.optim.AdamW(params=model.parameters(), lr=lr)
    for _ in range(max_epochs):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(train_embeddings), train_labels)
        loss.backward()
        optimizer.step()
    return model


def official_linear_probe_pytorch(small_f, small_y, val_f, val_y, train_f, train_y, max_epochs):
    """model/heads.py:90-115 (with logistic_regression.py:39-51 as the score)."""
    lrs = [0.01, 0.05, 0.1, 0.5, 1]
    best_acc, best_lr = 0, lrs[0]
    for lr in lrs:
        clf = official_fit_logistic_regression(small_f, small_y, max_epochs, lr)
        with torch.no_grad():
            pred = torch.argmax(clf(val_f), dim=-1).squeeze()
        score = (pred == val_y).sum() / float(val_y.shape[0]) * 100.0
        if score > best_acc:
            best_acc, best_lr = score, lr
    return official_fit_logistic_regression(train_f, train_y, max_epochs, best_lr), best_lr


def official_zs_head(clip, classnames, templates):
    """model/heads.py:17-61 (templates as str.format patterns)."""
    with torch.no_grad():
        rows = []
        for c in classnames:
            emb = clip.encode_text(open_clip.tokenize([t.format(c) for t in templates]))
            emb /= emb.norm(dim=-1, keepdim=True)
            emb = emb.mean(dim=0, keepdim=True)
            emb /= emb.norm()
            rows.append(emb)
        w = torch.stack(rows, dim=0)
        w = torch.transpose(w, 0, 2)
        w *= clip.logit_scale.exp()
        w = w.squeeze().float()
        return torch.transpose(w, 0, 1)


def official_cosine_lr(base_lr, warmup_length, steps):
    """train_utils.py:30-47, returning the lr of each step."""
    def lr_at(step):
        if step < warmup_length:
            return base_lr * (step + 1) / warmup_length
        e, es = step - warmup_length, steps - warmup_length
        return 0.5 * (1 + np.cos(np.pi * e / es)) * base_lr
    return lr_at


def official_eurosat_names(folders):
    """datasets/eurosat.py:10-16 (pretify_classname) and 69-86: folder names prettified, then mapped
    to OpenAI's names (the later lines replace the prettified ones)."""
    import re

    def pretify(classname):
        words = [w.lower() for w in re.findall(r'[A-Z](?:[a-z]+|[A-Z]*(?=[A-Z]|$))', classname)]
        out = ' '.join(words)
        return out + ' area' if out.endswith('al') else out

    ours_to_open_ai = {
        'annual crop': 'annual crop land', 'forest': 'forest', 'herbaceous vegetation': 'brushland or shrubland',
        'highway': 'highway or road', 'industrial area': 'industrial buildings or commercial buildings',
        'pasture': 'pasture land', 'permanent crop': 'permanent crop land',
        'residential area': 'residential buildings or homes or apartments', 'river': 'river', 'sea lake': 'lake or sea',
    }
    return tuple(ours_to_open_ai[pretify(c.replace('_', ' '))] for c in folders)


# ---- the pieces ---------------------------------------------------------------------------------

def _clusters(n_per_class: int, num_classes: int = 4, dim: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, dim, generator=g)
    y = torch.arange(num_classes).repeat(n_per_class)
    return centers[y] * 0.6 + torch.randn(len(y), dim, generator=g), y


def test_official_probe_equals_the_transcribed_official_code():
    train_f, train_y = _clusters(12)
    val_f, val_y = _clusters(4, seed=1)
    ours = fit_official_probe(train_f, train_y, val_f, val_y, 4, iterations=150, seed=7)
    torch.manual_seed(7)
    theirs, lr = official_linear_probe_pytorch(train_f, train_y, val_f, val_y, torch.cat([train_f, val_f]),
                                               torch.cat([train_y, val_y]), max_epochs=150)
    assert ours.lr == lr
    torch.testing.assert_close(ours.weight, theirs.weight.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.bias, theirs.bias.detach(), rtol=0, atol=1e-6)
    test_f, _ = _clusters(5, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(ours.logits(test_f), theirs(test_f), rtol=0, atol=1e-5)


def test_official_probe_refits_on_what_the_caller_passes_as_train():
    """LP-init (finetune.py:38 -> heads.py:153-172 with `<dataset>Val`) and EuroSAT's evaluation refit on
    the train split alone; ours with refit_on_val=False equals the transcription given train only."""
    train_f, train_y = _clusters(12)
    val_f, val_y = _clusters(4, seed=1)
    ours = fit_official_probe(train_f, train_y, val_f, val_y, 4, iterations=120, seed=3, refit_on_val=False)
    torch.manual_seed(3)
    theirs, lr = official_linear_probe_pytorch(train_f, train_y, val_f, val_y, train_f, train_y, max_epochs=120)
    assert ours.lr == lr
    torch.testing.assert_close(ours.weight, theirs.weight.detach(), rtol=0, atol=1e-6)
    both = fit_official_probe(train_f, train_y, val_f, val_y, 4, iterations=120, seed=3)
    assert not torch.allclose(both.weight, ours.weight, atol=1e-3)  # the refit data matters


def test_lp_init_refits_on_the_train_split_and_eurosat_evaluation_on_its_train_folder(tmp_path):
    from benchmark.run.runner import _load_splits, _split

    root = tmp_path / "data"
    fx.mnist(root), fx.eurosat(root)
    tasks.clear_memory()
    cfg = tiny_config(tmp_path, {"tasks": ["mnist", "eurosat"], "eval_only": [], "data_root": str(root),
                                 "eval": {"probe": "official", "probe_iterations": 30}})
    _, eval_sets = _load_splits(cfg, ("mnist", "eurosat"), ("mnist", "eurosat"))
    # mnist's val is the 10 % hold-out of train: the official evaluation refits on all of train (heads.py:172);
    # EuroSAT's val is its own folder: refit on the train folder only (EuroSAT.train_loader, eurosat.py:27)
    assert [(ds.name, ds.refit_on_val) for ds in eval_sets] == [("mnist", True), ("eurosat", False)]
    cfg = cfg.replace(tasks=["digits"], data_root=None)  # real images: LP-init on digits
    encoder = create_model("efficientnet_lite0", "package", image_size=cfg.model.image_size)
    model = MultiHeadClassifier(encoder)
    _init_head(cfg, "ft", model, 0, "digits", None, "cpu")
    cap = cfg.eval.probe_max_per_class
    train, val = _split(cfg, "digits", "train", cap), _split(cfg, "digits", "val", cap)
    from benchmark.evaluation.evaluate import extract_features

    expected = fit_official_probe(extract_features(encoder, train.x), train.y, extract_features(encoder, val.x),
                                  val.y, 10, 30, seed=cfg.seed, refit_on_val=False)
    assert not expected.weight.isnan().any()
    torch.testing.assert_close(model.heads["0"].linear.weight, expected.weight, rtol=0, atol=1e-6)


def test_official_probe_chooses_lr_on_validation_and_keeps_callers_rng():
    train_f, train_y = _clusters(10)
    val_f, val_y = _clusters(5, seed=1)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    probe = fit_official_probe(train_f, train_y, val_f, val_y, 4, iterations=50, seed=0)
    assert torch.equal(torch.rand(3), before)  # the probe's inits came from a forked, seeded RNG
    assert probe.lr in (0.01, 0.05, 0.1, 0.5, 1.0)
    again = fit_official_probe(train_f, train_y, val_f, val_y, 4, iterations=50, seed=0)
    assert torch.equal(again.weight, probe.weight)  # reproducible


def test_zs_init_head_equals_the_official_zero_shot_head(tiny_clip_checkpoint, tmp_path):
    path, _ = tiny_clip_checkpoint
    encoder = create_model("cfbench-tiny-vit", path)
    classes = list(tasks.task_classes("digits"))
    templates = ("a photo of a {}.", "a blurry photo of the {}.")
    ds = EvalDataset("digits", classes, templates, None, None)
    model = MultiHeadClassifier(encoder)
    cfg = tiny_config(tmp_path, {"train": {"head_init": "zs"}})
    _init_head(cfg, "ft", model, 0, "digits", {"digits": ZeroShotClassifier.build(encoder, ds)}, "cpu")
    expected = official_zs_head(open_clip.create_model("cfbench-tiny-vit", pretrained=path), classes, templates)
    head = model.heads["0"]
    torch.testing.assert_close(head.linear.weight, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(head.linear.bias, torch.zeros(10))
    x = torch.randn(4, 16)  # the head normalizes its input like ClassificationHead(normalize=True)
    official = OfficialClassificationHead(True, expected)
    torch.testing.assert_close(head(x), official(x), rtol=1e-5, atol=1e-5)


def test_warmup_cosine_equals_the_official_schedule_per_step():
    class Fake:
        dataloader, train_epochs = [None] * 37, 3
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)

    total, warmup, base = 37 * 3, 20, 1e-5
    plugin = WarmupCosinePlugin(base, warmup)
    plugin.before_training_exp(Fake)
    official = official_cosine_lr(base, warmup, total)
    for step in range(total):
        plugin.before_training_iteration(Fake)
        assert Fake.optimizer.param_groups[0]["lr"] == pytest.approx(official(step), rel=1e-12, abs=1e-20)


def test_a_task_shorter_than_the_warm_up_keeps_the_official_linear_ramp():
    class Fake:  # a 5-step ldifs task: 5 batches, one epoch, the protocol's 500 warm-up steps
        dataloader, train_epochs = [None] * 5, 1
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)

    plugin = WarmupCosinePlugin(1e-5, 500)
    plugin.before_training_exp(Fake)
    official = official_cosine_lr(1e-5, 500, 5)
    seen = []
    for step in range(5):
        plugin.before_training_iteration(Fake)
        seen.append(Fake.optimizer.param_groups[0]["lr"])
        assert seen[-1] == pytest.approx(official(step), rel=1e-12, abs=1e-20)
    assert seen[-1] == pytest.approx(1e-5 * 5 / 500)  # 1 % of the base lr, not the whole of it


def test_gradient_clipping_equals_the_official_call():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 3))
    model[0].bias.requires_grad_(False)  # a frozen parameter stays out, as requires_grad filters it
    x, y = torch.randn(16, 8) * 50, torch.randint(0, 3, (16,))

    def grads(clip):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        clip()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    class Strategy:
        pass

    Strategy.model = model
    plugin = GradClipPlugin(1.0)
    ours = grads(lambda: plugin.after_backward(Strategy))
    official = grads(lambda: torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0))
    assert float(plugin.last_norm) > 1.0  # the test really clips
    for a, b in zip(ours, official):
        assert torch.equal(a, b)
    assert math.isclose(torch.sqrt(sum((g ** 2).sum() for g in ours)).item(), 1.0, rel_tol=1e-5)


def test_random_resized_crop_is_torchvisions_transform_sample_by_sample():
    x = torch.randint(0, 256, (6, 3, 40, 40), dtype=torch.uint8)
    augment = RandomResizedCropBatch((0.9, 1.0))
    torch.manual_seed(5)
    ours = augment(x)
    reference = torchvision.transforms.RandomResizedCrop(40, scale=(0.9, 1.0), antialias=True,
                                                         interpolation=torchvision.transforms.InterpolationMode.BICUBIC)
    torch.manual_seed(5)
    theirs = torch.stack([reference(x[i]) for i in range(len(x))])
    assert ours.dtype == torch.uint8 and torch.equal(ours, theirs)
    torch.manual_seed(1)
    boxes = [b for _ in range(50) for b in augment.crop_boxes(torch.zeros(8, 3, 224, 224))]
    areas = np.array([h * w / 224 ** 2 for _, _, h, w in boxes])
    aspects = np.array([w / h for _, _, h, w in boxes])
    assert areas.min() >= 0.9 - 0.01 and areas.max() <= 1.0  # rounding to whole pixels
    assert aspects.min() >= 0.75 - 0.01 and aspects.max() <= 4 / 3 + 0.01
    assert all(t >= 0 and l >= 0 and t + h <= 224 and l + w <= 224 for t, l, h, w in boxes)
    assert areas.std() > 0.01  # a distribution, not one box


def test_zero_shot_uses_the_pretrained_text_tower_when_asked(tiny_clip_checkpoint):
    path, _ = tiny_clip_checkpoint
    encoder = create_model("cfbench-tiny-vit", path)
    train = load_split("digits", "train", 32, max_per_class=4)
    test = load_split("digits", "test", 32, max_per_class=5)
    ds = EvalDataset("digits", tasks.task_classes("digits"), ("a photo of the number {}.",), train, test)
    pretrained = {"digits": ZeroShotClassifier.build(encoder, ds)}
    with torch.no_grad():  # the text tower drifts (as a strategy that trained it would make it)
        for p in encoder.text_parameters():
            p.add_(torch.randn_like(p) * 0.5)
    drifted = ZeroShotClassifier.build(encoder, ds)
    assert not torch.allclose(drifted.weights, pretrained["digits"].weights)
    model = MultiHeadClassifier(encoder)
    settings = EvalConfig(probe_max_per_class=4)
    fixed = evaluate_round(model, [ds], {}, settings, zero_shot=pretrained)
    current = evaluate_round(model, [ds], {}, settings)
    from benchmark.evaluation.evaluate import extract_features
    from benchmark.evaluation.probe import accuracy

    test_f = extract_features(encoder, test.x)
    assert fixed.cells["zs"]["digits"] == accuracy(pretrained["digits"].logits(test_f), test.y)
    assert current.cells["zs"]["digits"] == accuracy(drifted.logits(test_f), test.y)


def test_openai_weights_build_quick_gelu(tiny_clip_checkpoint, tmp_path, monkeypatch):
    assert wants_quick_gelu("ViT-B-32", "openai") is True  # open_clip's metadata of the tag
    assert wants_quick_gelu("ViT-B-32", "laion2b_s34b_b79k") is False
    assert wants_quick_gelu("ViT-B-32", "openai", quick_gelu=False) is False  # an explicit choice wins
    path, _ = tiny_clip_checkpoint
    assert wants_quick_gelu("cfbench-tiny-vit", path) is False  # a local file carries no metadata

    def activations(model):
        return {type(m).__name__ for m in model.clip.visual.modules() if "GELU" in type(m).__name__}

    assert activations(create_model("cfbench-tiny-vit", path, quick_gelu=True)) == {"QuickGELU"}
    assert activations(create_model("cfbench-tiny-vit", path)) == {"GELU"}
    built = {}
    real = open_clip.create_model

    def spy(name, pretrained=None, **kw):  # what a `--pretrained openai` run asks open_clip for
        built.update(kw)
        return real(name, pretrained=None, **kw)

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # the tag's weights cached
    plant_hub_file(tmp_path, VIT_B_32_OPENAI_HUB, "open_clip_model.safetensors")
    monkeypatch.setattr(open_clip, "create_model", spy)
    model = create_model("ViT-B-32", "openai")
    assert built["force_quick_gelu"] is True and activations(model) == {"QuickGELU"}


def test_ldifs_templates_are_the_official_codes_and_default_stays_clip_benchmark():
    ldifs = load_template_set("ldifs")
    assert set(ldifs) == {"cars", "cifar10", "cifar100", "dtd", "eurosat", "food101", "gtsrb", "mnist", "imagenet",
                          "resisc45", "sun397", "svhn"}
    assert len(ldifs["imagenet"]) == 80 and ldifs["mnist"] == ('a photo of the number: "{}".',)
    assert ldifs["svhn"] == ('a photo of the number: "{}".',) and len(ldifs["cifar10"]) == 18
    assert task_templates("svhn", "ldifs") == ldifs["svhn"] and len(ldifs["resisc45"]) == 18
    for name in ("svhn", "resisc45"):  # where the official code's templates differ from clip-benchmark's
        assert task_templates(name) == tasks.get_task(name).templates != ldifs[name]
    assert task_templates("digits", "ldifs") == tasks.get_task("digits").templates  # not listed: default


# ---- whole runs ---------------------------------------------------------------------------------

def _clip_layer(path: str) -> dict:
    return {"model": {"name": "cfbench-tiny-vit", "pretrained": path, "image_size": None},
            "train": {"max_train_per_class": 8, "batch_size": 8, "warmup_steps": 1},
            "eval": {"probe_max_per_class": 6, "test_max_per_class": 5}, "eval_only": [], "figures": False}


@pytest.mark.parametrize("strategy", ["l2sp", "ewc", "ldifs"])
def test_text_tower_and_logit_scale_stay_bit_identical(tiny_clip_checkpoint, tmp_path, strategy):
    path, pretrained = tiny_clip_checkpoint
    cfg = tiny_config(tmp_path, _clip_layer(path), {"strategies": [strategy],
                                                    "train": {"weight_decay": 0.5, "lr": 1e-2}})
    run = run_strategy(cfg, strategy, tmp_path / strategy)
    checkpoint = torch.load(run / "checkpoints/state.pt", weights_only=True)
    state, reference = checkpoint["model"], pretrained.state_dict()
    text_keys = [k for k in reference if not k.startswith("visual.")]
    assert "logit_scale" in text_keys and any(k.startswith("transformer.") for k in text_keys)
    for k in text_keys:
        assert torch.equal(state[f"encoder.clip.{k}"], reference[k]), k
    assert any(not torch.equal(state[f"encoder.clip.{k}"], v) for k, v in reference.items()
               if k.startswith("visual.")), "the image tower trained"
    if strategy == "ewc":  # out of EWC's sums altogether, not just weighted by a zero importance
        (plugin,) = checkpoint["plugins"]
        for store in (plugin["saved_params"], plugin["importances"]):  # {exp: {name: ParamData}}, exported
            names = [k for _, params in store["items"] for k, _ in params["items"]]
            assert names and all(k.startswith(("encoder.clip.visual.", "heads.")) for k in names), names


def test_frozen_text_tower_is_out_of_the_optimizer(tiny_clip_checkpoint, tmp_path):
    from benchmark.run.runner import _learner

    path, _ = tiny_clip_checkpoint
    encoder = create_model("cfbench-tiny-vit", path)
    encoder.set_text_trainable(False)
    model = MultiHeadClassifier(encoder)
    model.ensure_head(0, 3)
    learner = _learner(tiny_config(tmp_path), model, [], [], ("digits",), "cpu")
    learner.model = model
    learner.make_optimizer()
    optimized = {id(p) for g in learner.optimizer.param_groups for p in g["params"]}
    assert all(id(p) not in optimized and not p.requires_grad for p in encoder.text_parameters())
    assert {id(p) for p in encoder.clip.visual.parameters()} <= optimized


def test_ldifs_with_augmentation_runs_the_reference_on_every_batch(tiny_clip_checkpoint, tmp_path):
    from strategies.ldifs import LDIFSPlugin

    path, _ = tiny_clip_checkpoint
    cfg = tiny_config(tmp_path, _clip_layer(path), {"tasks": ["digits"], "strategies": ["ldifs"],
                                                    "train": {"augment": {"kind": "rrc"}, "iterations": 3}})
    seen = []
    original = LDIFSPlugin.before_backward

    def spy(self, strategy, **kw):
        seen.append((self._cached is None, strategy.mb_x.clone()))
        return original(self, strategy, **kw)

    monkey = pytest.MonkeyPatch()
    monkey.setattr(LDIFSPlugin, "before_backward", spy)
    try:
        run = run_strategy(cfg, "ldifs", tmp_path / "aug")
    finally:
        monkey.undo()
    assert len(seen) == 3  # train.iterations: exactly 3 steps
    assert all(no_cache for no_cache, _ in seen)
    assert "reference runs on every batch" in (run / "log.txt").read_text()


def _fixture_protocol_run(tmp_path, checkpoint: str, mnist_epochs: int, probe_iterations: int, **extra):
    """A config file of the ldifs protocol scaled down: MNIST then EuroSAT as fixture datasets under
    tmp_path / "data", the tiny CLIP checkpoint."""
    root = tmp_path / "data"
    fx.mnist(root), fx.eurosat(root)
    tasks.clear_memory()
    config = tmp_path / "ldifs-tiny.yaml"
    config.write_text(yaml.safe_dump({
        "protocol": "ldifs", "tasks": ["mnist", "eurosat"], "eval_only": [],
        "model": {"name": "cfbench-tiny-vit", "pretrained": checkpoint},
        "train": {"batch_size": 8, "warmup_steps": 4, "epochs": {"mnist": mnist_epochs, "eurosat": 1}},
        "eval": {"probe_iterations": probe_iterations}, "threads": THREADS, "figures": False, **extra}))
    return config, root


def test_ldifs_protocol_runs_through_the_cli_on_fixture_datasets(tiny_clip_checkpoint, tmp_path):
    config, root = _fixture_protocol_run(tmp_path, tiny_clip_checkpoint[0], mnist_epochs=2, probe_iterations=100)
    out = tmp_path / "results"
    assert main(["run", str(config), "--data-root", str(root), "--out", str(out), "--strategy", "ldifs"]) == 0
    (run,) = out.glob("*/ldifs-s0")
    written = yaml.safe_load((run / "config.yaml").read_text())
    assert written["protocol"] == "ldifs" and written["train"]["grad_clip"] == 1.0
    assert written["train"]["augment"]["kind"] == "rrc" and written["eval"]["probe"] == "official"
    assert written["strategy_params"]["ldifs"]["alpha"] == 10.0 and written["train"]["lr"] == 1e-5
    for kind in ("zs", "lp", "head"):
        m = Matrix.load(run / f"matrices/{kind}.csv")
        assert m.rows == ["pretrained", "mnist", "eurosat"] and m.columns == ["mnist", "eurosat"]
    log = (run / "log.txt").read_text()
    assert "official probe, lr=" in log and "reference runs on every batch" in log


def test_zs_init_without_a_text_tower_is_one_clear_error(tmp_path, capsys):
    config = tmp_path / "zs.yaml"
    config.write_text(yaml.safe_dump({"train": {"head_init": "zs"}, "out": str(tmp_path / "results")}))
    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "head_init zs needs a text tower" in err[0]
    assert not (tmp_path / "results").exists()


def test_ldifs_class_names_where_they_differ(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar
    import torchvision.datasets.svhn as svhn

    from benchmark.config.templates import task_class_names

    for module in (cifar, svhn):  # fixture files cannot match the real archives' md5 sums
        monkeypatch.setattr(module, "check_integrity", lambda *a, **k: True)
    root = tmp_path / "data"
    fx.svhn(root), fx.eurosat(root), fx.cifar(root, 100)
    tasks.clear_memory()
    assert task_class_names("svhn", str(root), "ldifs") == tuple(str(i) for i in range(10))
    assert tasks.task_classes("svhn", str(root))[0] == "zero"
    eurosat = task_class_names("eurosat", str(root), "ldifs")
    assert eurosat == official_eurosat_names(tasks.task_classes("eurosat", str(root), source=True))
    assert task_class_names("cifar100", str(root), "ldifs")[0] == "thing_0"  # underscores kept, as cifar100.py:42
    assert tasks.task_classes("cifar100", str(root))[0] == "thing 0"
    assert task_class_names("digits", None, "ldifs") == tasks.task_classes("digits")  # not listed: the defaults


def test_lp_init_reuses_the_rounds_probe_and_resumes_byte_identical(tiny_clip_checkpoint, tmp_path, monkeypatch):
    """The official probe's lr search (5 fits) runs once per dataset per round: the next task's
    LP-init reuses the round's (same encoder, features, seed) and refits on the train split alone --
    one more fit for MNIST (the round refitted on train + val), none for EuroSAT (whose source fixes
    its val split, so the round's probe is that fit). --resume takes the head from the checkpoint."""
    import benchmark.evaluation.evaluate as evaluate
    import benchmark.evaluation.probe as probe
    from benchmark.config import load_config

    config, _ = _fixture_protocol_run(tmp_path, tiny_clip_checkpoint[0], mnist_epochs=1, probe_iterations=30,
                                      data_root=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"))
    cfg = load_config(str(config))
    searches, fits = [], []
    search, fit = evaluate.select_official_lr, probe._fit_torch_lr
    monkeypatch.setattr(evaluate, "select_official_lr", lambda *a, **k: searches.append(1) or search(*a, **k))
    monkeypatch.setattr(probe, "_fit_torch_lr", lambda *a, **k: fits.append(1) or fit(*a, **k))
    full = run_strategy(cfg, "ft", tmp_path / "full")
    assert len(searches) == 3 * 2  # rounds (pretrained, after mnist, after eurosat) x datasets; was 3 * 2 + 2
    assert len(fits) == 3 * 2 * 6 + 1  # 5 searched lrs + the refit per dataset per round; MNIST's LP-init refit
    log = (full / "log.txt").read_text()
    assert "LP-init head for mnist: official probe" in log and "LP-init head for eurosat: official probe" in log
    searches.clear()
    part = run_strategy(cfg, "ft", tmp_path / "part", stop_after=1)
    state = torch.load(part / "checkpoints" / "state.pt", weights_only=True)
    assert state["next_head"]["weight"].shape == (10, 16) and state["next_head"]["bias"].shape == (10,)
    searches.clear()
    assert main(["run", "--resume", str(part)]) == 0
    assert len(searches) == 2  # the round after eurosat; the eurosat head came from the checkpoint
    for kind in ("lp", "head", "zs", "lp_ece"):
        assert (part / f"matrices/{kind}.csv").read_bytes() == (full / f"matrices/{kind}.csv").read_bytes()
    resumed, uninterrupted = (torch.load(run / "checkpoints/state.pt", weights_only=True)["model"] for run in (part, full))
    assert [k for k, v in uninterrupted.items() if not torch.equal(resumed[k], v)] == []  # the LP-init head too
