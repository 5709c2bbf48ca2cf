"""The `zscl-mtil` protocol against ZSCL's official code (Thunderbeee/ZSCL, mtil/, commit b96e714).

`official_*` functions transcribe the official code (file:line in their docstrings)."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from avalanche.core import SupervisedPlugin
from avalanche.training import Naive

import tasks
from tasks.loading import load_split
from benchmark.cli import main
from benchmark.config import resolve
from benchmark.evaluation.matrix import Matrix
from benchmark.evaluation.multihead import MultiHeadClassifier, TextHead
from benchmark.models.factory import create_model
from benchmark.report.compare import zscl_table3
from benchmark.run.schedule import WarmupCosinePlugin
from strategies.zscl import ZSCLPlugin
from tests.test_plugins import tiny_benchmark
from tests.helpers import THREADS

from . import dataset_fixtures as fx


def official_text_classifier_loss(clip_model, images_uint8, labels, prompts, encoder, ls):
    """finetune.py:103-104, 213-224: texts = template(class) tokenized; embeddings from the current
    text tower, normalized; logits = logit_scale.exp() * normalized image features @ embeddings.T;
    cross-entropy with label smoothing."""
    texts = encoder.tokenizer(prompts)
    embeddings = clip_model.encode_text(texts)
    embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True)
    out = clip_model.encode_image(encoder.normalize(images_uint8))
    out = out / out.norm(dim=-1, keepdim=True)
    logits_per_image = clip_model.logit_scale.exp() * out @ embeddings.t()
    return F.cross_entropy(logits_per_image, labels, label_smoothing=ls)


def test_text_head_loss_equals_the_official_text_classifier(tiny_clip_checkpoint):
    path, _ = tiny_clip_checkpoint
    encoder = create_model("cfbench-tiny-vit", path)
    encoder.set_text_trainable(True)
    model = MultiHeadClassifier(encoder)
    prompts = ["a photo of a cat.", "a photo of a dog.", "a photo of a car."]
    head = model.ensure_text_head(0, prompts)
    assert isinstance(head, TextHead) and not list(head.parameters())  # the text tower is the classifier
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    y = torch.tensor([0, 1, 2, 1, 0])
    ours = torch.nn.CrossEntropyLoss(label_smoothing=0.2)(model(x, 0), y)
    theirs = official_text_classifier_loss(encoder.clip, x, y, prompts, encoder, 0.2)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    ours.backward()
    assert encoder.clip.token_embedding.weight.grad is not None  # both towers train ...
    assert encoder.clip.visual.conv1.weight.grad is not None
    assert encoder.clip.logit_scale.grad is None and not encoder.clip.logit_scale.requires_grad  # ... not logit_scale


def official_cosine_lr(base_lr, warmup_length, steps):
    """mtil/src/utils.py:17-32."""
    def lr_at(step):
        if step < warmup_length:
            return base_lr * (step + 1) / warmup_length
        return 0.5 * (1 + np.cos(np.pi * (step - warmup_length) / (steps - warmup_length))) * base_lr
    return lr_at


def test_schedule_spans_1000_steps_of_a_1001_step_task_with_per_task_lr():
    class Fake:
        dataloader, train_epochs = [None] * 1001, 1
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)

        class experience:
            current_experience = 1

    plugin = WarmupCosinePlugin([1e-5, 5e-5], 100, horizon=1000)
    plugin.before_training_exp(Fake)
    official = official_cosine_lr(5e-5, 100, 1000)  # the second task's lr (e.g. MNIST after Aircraft)
    lrs = []
    for step in range(1001):
        plugin.before_training_iteration(Fake)
        lrs.append(Fake.optimizer.param_groups[0]["lr"])
        assert lrs[-1] == pytest.approx(official(step), rel=1e-9, abs=1e-18)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-20)


def test_zscl_mtil_preset():
    cfg = resolve({"protocol": "zscl-mtil"})
    assert (cfg.model.name, cfg.model.pretrained, cfg.sequence, cfg.seed) == ("ViT-B-16", "openai", "mtil-order1", 42)
    t = cfg.train
    assert (t.iterations, t.schedule_steps, t.batch_size, t.weight_decay, t.warmup_steps) == (1001, 1000, 64, 0.0, 100)
    assert (t.head, t.label_smoothing, t.split, t.augment.kind, t.grad_clip) == ("text", 0.2, "trainval", "rrc", None)
    assert t.lr_for("aircraft") == t.lr_for("mnist") == 5e-5 and t.lr_for("dtd") == 1e-5
    assert (cfg.eval.zs_text, cfg.eval.templates) == ("current", "zscl")
    z = cfg.strategy_params["zscl"]
    assert (z["reference_task"], z["l2"], z["avg_freq"], z["text_loss"], z["ref_batch_size"]) == ("imagenet", 1.0, 100,
                                                                                                   True, 64)
    assert cfg.strategy_params["wise-ft"] == {"beta": 0.8}
    assert cfg.strategies == ["ft", "lwf-clip", "icarl", "lwf-vr", "wise-ft", "zscl", "moe-adapters", "diki"]
    # the MoE-Adapters row: its own per-task lr (order I's list, kept per dataset), the rest as the protocol's
    moe = cfg.for_strategy("moe-adapters")
    assert [moe.train.lr_for(n) for n in tasks.SEQUENCES["mtil-order1"].tasks] == \
        [5e-3, 1e-3, 5e-3, 1e-3, 1e-4, 1e-3, 1e-3, 1e-4, 1e-3, 1e-3, 1e-3]
    assert moe.rows == {} and moe.train.iterations == 1001 and moe.train.label_smoothing == 0.2
    assert cfg.for_strategy("zscl").train.lr_for("aircraft") == 5e-5 and cfg.for_strategy("zscl").rows == {}
    assert cfg.strategy_params["moe-adapters"]["threshold"] == 0.0655
    assert "eurosat_mtil" in tasks.SEQUENCES["mtil-order1"].tasks


def test_eurosat_mtil_is_zscls_80_20_split_of_all_images(tmp_path):
    fx.eurosat(tmp_path)
    tasks.clear_memory()
    found = tasks.loaded_task("eurosat_mtil", str(tmp_path))
    files = sorted((c.name, f.name) for c in (tmp_path / "eurosat" / "2750").iterdir() for f in c.iterdir())
    n = len(files)
    # collections.py:69-77: random_split(dataset, [int(0.8 n), rest], generator seed 42) of ImageFolder's order
    train_idx, test_idx = torch.utils.data.random_split(range(n), [int(0.8 * n), n - int(0.8 * n)],
                                                        generator=torch.Generator().manual_seed(42))
    got = {s: sorted(p.split("/")[-1] for p in found.splits[s].paths) for s in ("train", "test")}
    assert got["train"] == sorted(files[i][1] for i in train_idx)
    assert got["test"] == sorted(files[i][1] for i in test_idx)
    assert "val" not in found.splits


def test_trainval_is_the_whole_train_split(tmp_path):
    train, val = load_split("digits", "train", 16), load_split("digits", "val", 16)
    whole = load_split("digits", "trainval", 16)
    assert len(whole) == len(train) + len(val)
    fx.eurosat(tmp_path)  # a task with a fixed validation split: its train and val files
    tasks.clear_memory()
    parts = [load_split("eurosat", s, 16, str(tmp_path)) for s in ("train", "val", "trainval")]
    assert len(parts[2]) == len(parts[0]) + len(parts[1])
    assert torch.equal(parts[2].y, torch.cat([parts[0].y, parts[1].y]))


def test_lwf_clip_teacher_is_the_model_as_each_task_starts():
    from tests.test_plugins import model_with_heads

    refs = {t: torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8) for t in range(2)}
    texts = {0: ["a cat.", "a dog."], 1: ["a car.", "a bus.", "a tree."]}
    plugin = ZSCLPlugin(teacher="previous", reference_for=lambda t: (refs[t], texts[t]), ref_batch_size=3,
                        weight_ensemble=False, text_loss=True)
    model = model_with_heads(4)
    starts = []

    class Start(SupervisedPlugin):
        def before_training_exp(self, strategy, **kwargs):
            starts.append(copy.deepcopy(strategy.model.encoder.state_dict()))

    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                     criterion=torch.nn.CrossEntropyLoss(), train_mb_size=6, plugins=[Start(), plugin])
    for exp in tiny_benchmark().train_stream:
        strategy.train(exp, eval_streams=[])
    assert plugin.reference_images is refs[1] and plugin._text_embeddings.shape[0] == 3
    for k, v in plugin.teacher.state_dict().items():
        assert torch.equal(v, starts[1][k]), k  # the teacher of task 2 is the model after task 1
    assert any(not torch.equal(starts[0][k], starts[1][k]) for k in starts[0])


def test_table3_layout_by_hand():
    zs = Matrix(["pretrained", "a", "b", "c"], ["a", "b", "c"],
                [[50, 40, 30], [90, 41, 31], [80, 95, 32], [70, 85, 99]])
    table = zscl_table3([("zscl", zs)]).splitlines()
    assert table[0] == "| method | metric | a | b | c | average |"
    # Transfer: b from row a (41), c from rows a, b (31, 32 -> 31.5); average of 41 and 31.5
    assert table[2] == "| zscl | Transfer | – | 41.0 | 31.5 | 36.2 |"
    assert table[3] == "| zscl | Avg | 80.0 | 73.7 | 54.0 | 69.2 |"
    assert table[4] == "| zscl | Last | 70.0 | 85.0 | 99.0 | 84.7 |"


def test_mtil_shaped_run_through_the_cli(tiny_clip_checkpoint, tmp_path):
    """Three MTIL-format tasks, the zscl-mtil protocol scaled down, the four Table 3 strategies."""
    path, _ = tiny_clip_checkpoint
    root = tmp_path / "data"
    fx.mnist(root), fx.eurosat(root), fx.dtd(root)
    tasks.clear_memory()
    config = tmp_path / "mtil-tiny.yaml"
    config.write_text(yaml.safe_dump({
        "protocol": "zscl-mtil", "tasks": ["mnist", "eurosat_mtil", "dtd"], "eval_only": [],
        "model": {"name": "cfbench-tiny-vit", "pretrained": path},
        "train": {"batch_size": 8, "iterations": 5, "schedule_steps": 4, "warmup_steps": 2},
        "eval": {"probe_max_per_class": 3},
        "strategy_params": {"zscl": {"reference_task": "photo_patches", "avg_freq": 2, "ref_batch_size": 8},
                            "lwf-clip": {"ref_batch_size": 8}, "lwf-vr": {"ref_batch_size": 8}},
        "strategies": ["ft", "lwf-clip", "lwf-vr", "wise-ft", "zscl"], "threads": THREADS, "figures": False}))
    out = tmp_path / "results"
    assert main(["run", str(config), "--data-root", str(root), "--out", str(out)]) == 0
    (invocation,) = out.iterdir()
    for strategy in ("ft", "lwf-clip", "lwf-vr", "wise-ft", "zscl"):
        run = invocation / f"{strategy}-s42"
        zs = Matrix.load(run / "matrices/zs.csv")
        assert zs.rows == ["pretrained", "mnist", "eurosat_mtil", "dtd"]
        assert np.all((zs.array() >= 0) & (zs.array() <= 100))
        head = Matrix.load(run / "matrices/head.csv").array()
        assert not np.isnan(head[3]).any()  # every task's text head is defined after the last task
    log = (invocation / "zscl-s42/log.txt").read_text()
    assert "reference texts are" in log and "class prompts of photo_patches" in log
    table3 = (invocation / "table3.md").read_text()
    assert table3.count("| Transfer |") == 5 and "| zscl | Last |" in table3


def test_wise_ft_beta_08_is_zscls_merge_with_the_previous_tasks_model():
    """finetune.py:332-340 with --wise_ft_model n --wise_ft_alpha 0.8: every parameter becomes
    0.8 * trained + 0.2 * the model the task started from (the previous task's), on text heads."""
    from strategies.wise_ft import WiSEFTPlugin
    from tests.helpers import tiny_clip_vit
    from tests.test_plugins import Snapshot

    torch.manual_seed(0)
    model = MultiHeadClassifier(tiny_clip_vit(layers=2))
    for t in range(2):
        model.ensure_text_head(t, ["a cat.", "a dog.", "a car."])
    snap, starts = Snapshot(), []

    class Start(SupervisedPlugin):
        def before_training_exp(self, strategy, **kwargs):
            starts.append({k: p.detach().clone() for k, p in strategy.model.named_parameters()})

    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                     criterion=torch.nn.CrossEntropyLoss(label_smoothing=0.2), train_mb_size=6,
                     plugins=[Start(), snap, WiSEFTPlugin(beta=0.8)])
    for exp in tiny_benchmark().train_stream:
        strategy.train(exp, eval_streams=[])
    alpha, changed = 0.8, 0
    for k, param_q in model.named_parameters():
        trained, fixed = snap.after[1][k], starts[1][k]  # wise_ft_model = the loaded previous checkpoint
        torch.testing.assert_close(param_q.detach(), trained * alpha + fixed * (1 - alpha))
        changed += int(not torch.equal(trained, fixed))
    assert changed > 0 and any("transformer" in k and "visual" not in k for k in dict(model.named_parameters()))


def test_zscl_class_names_where_they_differ(tmp_path):
    from benchmark.config.templates import task_class_names
    from benchmark.errors import CfbenchError

    root = tmp_path / "data"
    fx.mnist(root), fx.sun397(root)
    tasks.clear_memory()
    ours = tasks.task_classes("mnist", str(root))
    zscl = task_class_names("mnist", str(root), "zscl")
    assert zscl[:2] == ("0 - zero", "1 - one") and ours[:2] == ("0", "1")  # torchvision's MNIST.classes
    assert task_class_names("sun397", str(root), "zscl")[0] == "aplace_000"  # the source's own, "_" kept
    assert tasks.task_classes("sun397", str(root))[0] == "aplace 000"
    names = tmp_path / "names.yaml"
    names.write_text("sun397: source-readable\ndigits: [zero, one]\n")
    assert task_class_names("sun397", str(root), str(names))[0] == "aplace 000"
    with pytest.raises(CfbenchError, match="digits has 10 classes, the file names 2"):
        task_class_names("digits", None, str(names))
    assert len(task_class_names("faces", None, str(names))) == 2  # not listed: its defaults


def test_zscl_reference_texts_from_a_captions_file(tmp_path):
    from benchmark.errors import CfbenchError
    from strategies import BuildContext, build_plugins, resolve_params

    captions = tmp_path / "cc_val.txt"
    captions.write_text("a dog on a beach\n\n  two people riding bikes  \n")
    params = resolve_params("zscl", {"zscl": {"reference_texts": str(captions), "reference_task": "digits"}})
    (plugin,) = build_plugins("zscl", params, BuildContext(image_size=16))
    assert plugin.reference_texts == ["a dog on a beach", "two people riding bikes"]
    # the reference task's whole train split (ZSCL's ImageNet train folder), no validation hold-out out of it
    whole = load_split("digits", "trainval", 16)
    assert len(whole) > len(load_split("digits", "train", 16))
    assert torch.equal(plugin.reference_images, whole.x)
    captions.write_text("\n \n")
    with pytest.raises(CfbenchError, match="no captions in it"):
        build_plugins("zscl", params, BuildContext(image_size=16))


@pytest.mark.parametrize("strategy", ["zscl", "lwf-clip", "lwf-vr"])
def test_resume_of_zscl_and_its_lwf_baselines_is_the_uninterrupted_run(tiny_clip_checkpoint, tmp_path, strategy):
    """A pretrained teacher (zscl) is kept in state.pt; a previous-task teacher (lwf-clip, lwf-vr) is the
    encoder as the next task starts and is copied again there: the checkpoint holds no second encoder."""
    from benchmark.run.runner import run_strategy
    from tests.helpers import assert_resumed_run_is_the_uninterrupted_one, tiny_config

    path, _ = tiny_clip_checkpoint
    cfg = tiny_config(tmp_path, {
        "protocol": "zscl-mtil", "tasks": ["digits", "faces"], "eval_only": [], "strategies": [strategy],
        "model": {"name": "cfbench-tiny-vit", "pretrained": path, "image_size": None},
        "train": {"batch_size": 8, "iterations": 4, "schedule_steps": 3, "warmup_steps": 1, "max_train_per_class": 8},
        "eval": {"probe_max_per_class": 4, "test_max_per_class": 4, "templates": None, "classnames": None},
        "strategy_params": {"zscl": {"reference_task": "photo_patches", "avg_freq": 2, "ref_batch_size": 4}},
        "figures": False})
    full = run_strategy(cfg, strategy, tmp_path / "full")
    part = run_strategy(cfg, strategy, tmp_path / "part", stop_after=1)
    state = torch.load(part / "checkpoints" / "state.pt", weights_only=True)
    assert {k for plugin in state["plugins"] for k in plugin} == \
        ({"teacher", "_text_embeddings"} if strategy == "zscl" else set())
    # every final weight, not the matrices alone: 4 test images per class do not see a wrong teacher
    assert_resumed_run_is_the_uninterrupted_one(full, part, "text")


@pytest.mark.parametrize("strategy", ["lwf-clip", "lwf-vr", "icarl"])
def test_distillation_on_a_tasks_own_data_sees_only_the_images_it_trains_on(tmp_path, strategy):
    """LwF's reference set and iCaRL's exemplar candidates are the run's own training images of the
    task, capped as the run caps them: a 5-shot task (mtil-fewshot) distils on its 5 shots, not on the
    rest of its split."""
    from types import SimpleNamespace

    import open_clip

    from benchmark.run.runner import _plugin_context, _read_splits
    from strategies import build_plugins, resolve_params
    from tasks.compact import gather
    from tests.helpers import tiny_config

    trained = ("digits", "faces")
    cfg = tiny_config(tmp_path, {"protocol": "zscl-mtil", "tasks": list(trained), "eval_only": [],
                                 "model": {"image_size": 16}, "train": {"max_train_per_class": 8},
                                 "eval": {"templates": None, "classnames": None}})
    encoder = SimpleNamespace(image_size=16, tokenizer=open_clip.get_tokenizer("ViT-B-32"))
    (plugin,) = build_plugins(strategy, resolve_params(strategy, {}), _plugin_context(cfg, encoder, trained, strategy))
    train_splits, _ = _read_splits(cfg, trained, ())
    assert len(train_splits[0]) == 80  # 8 per class of the split's 1,258
    for t, split in enumerate(train_splits):
        images = plugin.images_of(t) if strategy == "icarl" else plugin.reference_for(t)[0]
        everything = slice(0, max(len(images), len(split.x)))
        assert torch.equal(gather(images, everything, "cpu"), gather(split.x, everything, "cpu")), trained[t]


def official_virtual_vocab(encoder_vocab, length=10, n_class=1000):
    """helpers.py:54-62 (the global RNG)."""
    voc_len = len(encoder_vocab)
    texts = torch.randint(0, voc_len, (n_class, length))
    start = torch.full((n_class, 1), encoder_vocab["<start_of_text>"])
    end = torch.full((n_class, 1), encoder_vocab["<end_of_text>"])
    zeros = torch.zeros((n_class, 75 - length), dtype=torch.long)
    return torch.cat([start, texts, end, zeros], dim=1)


def test_lwf_vr_reference_texts_are_zscls_random_vocabulary():
    import open_clip

    from strategies import BuildContext, build_plugins, resolve_params
    from strategies.zscl import virtual_vocab

    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    g = torch.Generator().manual_seed(3)
    ours = virtual_vocab(tokenizer, g)
    torch.manual_seed(3)  # the official draws from the global RNG; the same draws from a seeded generator
    assert torch.equal(ours, official_virtual_vocab(tokenizer.encoder))
    assert ours.shape == (1000, 77) and ours.dtype == torch.long
    ctx = BuildContext(image_size=16, tasks=("digits", "faces"), tokenizer=tokenizer, template_of=lambda n: "{}",
                       classes_of=lambda n: ("a", "b"))
    (plugin,) = build_plugins("lwf-vr", resolve_params("lwf-vr", {}), ctx)
    images0, tokens0 = plugin.reference_for(0)
    _, tokens1 = plugin.reference_for(1)
    assert tokens0.shape == (1000, 77) and not torch.equal(tokens0, tokens1)  # drawn anew per task
    assert torch.equal(plugin.reference_for(0)[1], tokens0)  # seeded: a resumed run draws the same
    assert len(images0) == len(load_split("digits", "train", 16))


def test_the_few_shot_protocols_print_their_shots_and_iterations(capsys):
    """mtil-fewshot: MoE-Adapters' few-shot script (5 shots, 500 iterations, its lr list and test threshold);
    diki-mtil-fs: DIKI's MTIL-FS (16 shots of eight datasets, 4 per class for the best epoch)."""
    from benchmark.cli import main

    assert main(["run", "--protocol", "mtil-fewshot", "--print-config"]) == 2  # the data is not here
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["train"]["max_train_per_class"], printed["train"]["iterations"],
            printed["train"]["schedule_steps"]) == (5, 501, 500)
    assert printed["rows"]["moe-adapters"]["train"]["lr"]["aircraft"] == 8e-3
    assert printed["strategy_params"]["moe-adapters"]["threshold"] == 0.06
    few = resolve({"protocol": "mtil-fewshot", "sequence": "mtil-order2"})
    assert few.for_strategy("moe-adapters").train.lr_for("cifar100") == 2e-4 and few.train.lr_for("mnist") == 5e-5
    assert main(["run", "--protocol", "diki-mtil-fs", "--print-config"]) == 2
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["sequence"], printed["strategies"], printed["train"]["max_train_per_class"]) == \
        ("mtil-fs-diki", ["diki"], 16)
    assert printed["strategy_params"]["diki"]["val_per_class"] == 4 and printed["eval"]["batch_size"] == 256
    assert tasks.SEQUENCES["mtil-fs-diki"].tasks == ("aircraft", "caltech101_coop", "cifar100", "dtd_coop", "flowers_coop",
                                                     "food101_coop", "cars_coop", "sun397_coop")


def test_a_reference_set_the_run_also_evaluates_is_named_in_the_log(tiny_clip_checkpoint, tmp_path):
    """ZSCL distils on its reference task's training images: when the run also evaluates that dataset
    (the default photo_patches beside the demo's eval-only photo_patches), its cells there measure a
    dataset ZSCL learns from, and the log says so; a reference the run does not evaluate is not named."""
    from benchmark.config.plan import evaluated_references
    from benchmark.run.runner import run_strategy
    from tests.helpers import tiny_config

    assert evaluated_references({"zscl": {"reference_task": "imagenet"}, "lora": {}}, ("cars", "svhn")) == []
    (line,) = evaluated_references({"moe-adapters": {"reference_task": "svhn"}}, ("cars", "svhn"))
    assert line.startswith("moe-adapters reads the training images of svhn") and "reference_task" in line
    path, _ = tiny_clip_checkpoint
    cfg = tiny_config(tmp_path, {
        "tasks": ["digits"], "eval_only": ["photo_patches"], "strategies": ["zscl"],
        "model": {"name": "cfbench-tiny-vit", "pretrained": path, "image_size": None},
        "train": {"batch_size": 8, "iterations": 2, "max_train_per_class": 4},
        "eval": {"probe_max_per_class": 2, "test_max_per_class": 2},
        "strategy_params": {"zscl": {"ref_batch_size": 4}}, "figures": False})
    log = (run_strategy(cfg, "zscl", tmp_path / "run") / "log.txt").read_text()
    assert "zscl reads the training images of photo_patches, which this run also evaluates" in log
