import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin
from avalanche.training import Naive

from strategies.zscl import ZSCLPlugin
from strategies.zscl import soft_cross_entropy
from tests.helpers import tiny_clip_vit
from tests.test_plugins import model_with_heads, tiny_benchmark

TEXTS = ["a photo of a cat.", "a photo of a dog.", "a photo of a car."]


def test_soft_cross_entropy_by_hand():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 1.0]])
    t = torch.tensor([[0.5, 1.5, 2.0], [1.0, 1.0, -2.0]])
    T = 2.0
    expected = 0.0
    for i in range(2):
        p = np.exp(t[i].numpy() / T) / np.exp(t[i].numpy() / T).sum()
        logq = s[i].numpy() / T - np.log(np.exp(s[i].numpy() / T).sum())
        expected += -(p * logq).sum() / 2
    assert soft_cross_entropy(s, t, T).item() == pytest.approx(expected * T ** 2, rel=1e-6)


class Record(SupervisedPlugin):
    def __init__(self, zscl):
        super().__init__()
        self.zscl, self.rows, self.starts = zscl, [], []

    def before_training_exp(self, strategy, **kwargs):
        self.starts.append(copy.deepcopy(strategy.model.encoder.state_dict()))

    def before_backward(self, strategy, **kwargs):
        self.rows.append({"loss": strategy.loss.detach().clone(),
                          "ce": strategy._criterion(strategy.mb_output, strategy.mb_y).detach(),
                          "state": copy.deepcopy(strategy.model.encoder.state_dict()),
                          "ref": self.zscl.last_reference_batch, "start": self.starts[-1]})

    def after_training_iteration(self, strategy, **kwargs):
        self.rows[-1]["after"] = {k: p.detach().clone() for k, p in strategy.model.named_parameters()}


def _train(plugin, epochs=1, record_first=False):
    model = model_with_heads(4)
    initial = copy.deepcopy(model.encoder.state_dict())
    record = Record(plugin)
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                     criterion=torch.nn.CrossEntropyLoss(), train_mb_size=6, train_epochs=epochs,
                     plugins=[record, plugin] if record_first else [plugin, record])
    for exp in tiny_benchmark().train_stream:
        strategy.train(exp, eval_streams=[])
    return model, initial, record.rows


def official_distillation(t, s, T=2):
    """ZSCL mtil/src/models/helpers.py:64-67."""
    p = F.softmax(t / T, dim=1)
    return F.cross_entropy(s / T, p, reduction="mean") * (T ** 2)


def official_l2_loss(model, model_ref):
    """helpers.py:47-51."""
    loss = 0.0
    for q, k in zip(model.parameters(), model_ref.parameters()):
        loss += F.mse_loss(q, k.detach(), reduction="sum")
    return loss


def official_distillation_terms(teacher, student, ref_images, texts, T):
    """finetune.py:248-281 with --image_loss --text_loss (weight 1 each; logit_scale = the trained
    model's); icarl.py:179-216 is the same code line for line. Images go through cfbench's uint8
    preprocessing (teacher(x) = encode_image)."""
    logit_scale = student.clip.logit_scale
    ref_embeddings = teacher.encode_text(teacher.tokenizer(texts))
    ref_embeddings = ref_embeddings / ref_embeddings.norm(dim=-1, keepdim=True)
    ref_out = teacher(ref_images)
    ref_out = ref_out / ref_out.norm(dim=-1, keepdim=True)
    ref_out_current = student(ref_images)
    ref_out_current = ref_out_current / ref_out_current.norm(dim=-1, keepdim=True)
    logits_current = logit_scale.exp() * ref_out_current @ ref_embeddings.t()
    logits_ref = logit_scale.exp() * ref_out @ ref_embeddings.t()
    loss = official_distillation(logits_ref, logits_current, T)
    return loss + official_distillation(logits_ref.t(), logits_current.t(), T)


def official_zscl_terms(teacher, student, ref_images, texts, T, l2, l2_model):
    """finetune.py:248-290: the distillation terms and --l2."""
    return official_distillation_terms(teacher, student, ref_images, texts, T) + l2 * official_l2_loss(
        student.clip, l2_model.clip)


def test_zscl_loss_equals_the_transcribed_official_terms():
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    plugin = ZSCLPlugin(images, TEXTS, temperature=2.0, ref_batch_size=5, text_loss=True, l2=0.3,
                        weight_ensemble=False)
    _, initial, rows = _train(plugin)
    teacher, student, l2_model = tiny_clip_vit(4).eval(), tiny_clip_vit(4), tiny_clip_vit(4)
    teacher.load_state_dict(initial)
    row = rows[-1]  # second experience, after several updates
    student.load_state_dict(row["state"])
    l2_model.load_state_dict(row["start"])  # the weights the task started from
    assert any(not torch.equal(row["state"][k], row["start"][k]) for k in row["start"])
    with torch.no_grad():
        expected = official_zscl_terms(teacher, student, row["ref"], TEXTS, 2.0, 0.3, l2_model)
    assert (row["loss"] - row["ce"]).item() == pytest.approx(expected.item(), rel=1e-4)
    assert expected.item() > 0


def test_zscl_merges_at_iterations_0_freq_2freq_as_the_official_loop():
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    plugin = ZSCLPlugin(images, TEXTS, ref_batch_size=4, avg_freq=3)
    model = model_with_heads(4)
    start = {k: p.detach().clone() for k, p in model.encoder.named_parameters()}
    record = Record(plugin)
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                     criterion=torch.nn.CrossEntropyLoss(), train_mb_size=2, train_epochs=1, plugins=[record, plugin])
    strategy.train(tiny_benchmark().train_stream[0], eval_streams=[])
    n_iter = len(record.rows)
    assert n_iter >= 6 and plugin.merged_at == list(range(0, n_iter, 3))
    # finetune.py:309-320 + helpers.py:31-34: we_model = the task's start; after the step of
    # iteration i with i % avg_freq == 0: we_n += 1; we = (we * we_n + theta) / (1 + we_n)
    we, we_n = {k: v.clone() for k, v in start.items()}, 0
    for i, row in enumerate(record.rows):
        if i % 3 == 0:
            we_n += 1
            we = {k: (we[k] * we_n + row["after"][f"encoder.{k}"]) / (1.0 + we_n) for k in we}
    for k, p in model.encoder.named_parameters():
        torch.testing.assert_close(p.detach(), we[k])
    # heads are not averaged: the task's head keeps its trained weights
    for k, p in model.heads.named_parameters():
        assert torch.equal(p.detach(), record.rows[-1]["after"][f"heads.{k}"])


def test_teacher_features_are_computed_once_per_reference_image():
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    plugin = ZSCLPlugin(images, TEXTS, ref_batch_size=4, weight_ensemble=False)
    _, _, rows = _train(plugin, epochs=2)
    assert len(rows) * 4 > 10 and plugin.teacher_images == 10  # many draws, each image encoded once
    teacher = plugin.teacher
    with torch.no_grad():
        direct = F.normalize(teacher(images), dim=-1)
    torch.testing.assert_close(plugin._teacher_features, direct, rtol=1e-5, atol=1e-6)


def test_teacher_features_over_the_budget_are_kept_float16_and_the_loss_barely_moves():
    """feature_budget_mb: the float32 store would not fit, so the features are float16 -- the
    teacher's normalized features rounded to 11 significant bits; the distillation loss over the
    same steps differs by under 0.1 % (the weights trained from it: see BENCHMARKS.md)."""
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    exact = ZSCLPlugin(images, TEXTS, ref_batch_size=4, weight_ensemble=False)
    half = ZSCLPlugin(images, TEXTS, ref_batch_size=4, weight_ensemble=False, feature_budget_mb=0.0001)
    _, _, rows32 = _train(exact, epochs=2)
    _, _, rows16 = _train(half, epochs=2)
    assert exact._teacher_features.dtype == torch.float32 and half._teacher_features.dtype == torch.float16
    assert half.teacher_images == 10
    with torch.no_grad():
        direct = F.normalize(half.teacher(images), dim=-1)
    torch.testing.assert_close(half._teacher_features.float(), direct.half().float(), rtol=0, atol=1e-6)
    for a, b in zip(rows32, rows16):
        distil32, distil16 = (a["loss"] - a["ce"]).item(), (b["loss"] - b["ce"]).item()
        assert distil16 == pytest.approx(distil32, rel=1e-3) and distil32 > 0


def test_zscl_refuses_image_only_models():
    from benchmark.evaluation.multihead import MultiHeadClassifier
    from benchmark.models.efficientnet import EfficientNetLite0

    model = MultiHeadClassifier(EfficientNetLite0(pretrained=None, image_size=32))
    model.ensure_head(0, 3)
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                     criterion=torch.nn.CrossEntropyLoss(), train_mb_size=6,
                     plugins=[ZSCLPlugin(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), TEXTS)])
    with pytest.raises(ValueError, match="text tower"):
        strategy.train(tiny_benchmark().train_stream[0], eval_streams=[])


def test_reference_batches_pass_over_the_set_before_repeating():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 2, 2).contiguous()
    plugin = ZSCLPlugin(images, TEXTS, ref_batch_size=4)
    plugin._generator.manual_seed(0)
    seen = [plugin._next_indices() for _ in range(3)]  # 4 + 4 + 2: one shuffled pass
    assert sorted(torch.cat(seen).tolist()) == list(range(10)) and [len(s) for s in seen] == [4, 4, 2]


def test_reference_images_may_be_a_compact_store():
    """ZSCL reads its reference set through `gather`: a compact store (here native pixels at the
    model's size) gives the same losses as the uint8 tensor."""
    from tasks.compact import NativeImages

    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    losses = []
    for refs in (images, NativeImages(images.numpy(), 32)):
        torch.manual_seed(0)
        plugin = ZSCLPlugin(refs, TEXTS, ref_batch_size=4, l2=0.3)
        _, _, rows = _train(plugin)
        losses.append(torch.stack([r["loss"] for r in rows]))
    assert torch.equal(losses[0], losses[1])
