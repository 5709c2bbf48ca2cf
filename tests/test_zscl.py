import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin
from avalanche.training import Naive

from strategies import ZSCLPlugin
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
        self.zscl, self.rows = zscl, []

    def before_backward(self, strategy, **kwargs):
        self.rows.append({"loss": strategy.loss.detach().clone(),
                          "ce": strategy._criterion(strategy.mb_output, strategy.mb_y).detach(),
                          "state": copy.deepcopy(strategy.model.encoder.state_dict()),
                          "ref": self.zscl.last_reference_batch})

    def after_training_iteration(self, strategy, **kwargs):
        self.rows[-1]["after"] = {k: p.detach().clone() for k, p in strategy.model.named_parameters()}


def _train(plugin, epochs=1):
    model = model_with_heads(4)
    initial = copy.deepcopy(model.encoder.state_dict())
    record = Record(plugin)
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                     criterion=torch.nn.CrossEntropyLoss(), train_mb_size=6, train_epochs=epochs,
                     plugins=[plugin, record])
    for exp in tiny_benchmark().train_stream:
        strategy.train(exp, eval_streams=[])
    return model, initial, record.rows


def test_zscl_distillation_term_equals_independent_computation():
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    plugin = ZSCLPlugin(images, TEXTS, temperature=2.0, ref_batch_size=5, weight_ensemble=False)
    _, initial, rows = _train(plugin)
    teacher, student = tiny_clip_vit(4).eval(), tiny_clip_vit(4)
    teacher.load_state_dict(initial)
    row = rows[-1]  # second experience, after several updates
    student.load_state_dict(row["state"])
    with torch.no_grad():
        text = F.normalize(teacher.encode_text(teacher.tokenizer(TEXTS)), dim=-1)
        scale = teacher.clip.logit_scale.exp()
        t_logits = scale * F.normalize(teacher(row["ref"]), dim=-1) @ text.T
        s_logits = scale * F.normalize(student(row["ref"]), dim=-1) @ text.T
        expected = -(F.softmax(t_logits / 2, 1) * F.log_softmax(s_logits / 2, 1)).sum(1).mean() * 4
    assert (row["loss"] - row["ce"]).item() == pytest.approx(expected.item(), rel=1e-4)
    assert expected.item() > 0


def test_zscl_weight_ensemble_is_running_mean_of_checkpoints():
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    plugin = ZSCLPlugin(images, TEXTS, ref_batch_size=4, avg_freq=1)
    model = model_with_heads(4)
    start = {k: p.detach().clone() for k, p in model.named_parameters()}
    record = Record(plugin)
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                     criterion=torch.nn.CrossEntropyLoss(), train_mb_size=6, train_epochs=1, plugins=[record, plugin])
    strategy.train(tiny_benchmark().train_stream[0], eval_streams=[])
    snapshots = [start] + [r["after"] for r in record.rows]  # initial weights count once, as in ZSCL
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), torch.stack([s[k] for s in snapshots]).mean(0))


def test_zscl_refuses_image_only_models():
    from benchmark.multihead import MultiHeadClassifier
    from benchmark.models import EfficientNetLite0

    model = MultiHeadClassifier(EfficientNetLite0(pretrained=None, image_size=32))
    model.ensure_head(0, 3)
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                     criterion=torch.nn.CrossEntropyLoss(), train_mb_size=6,
                     plugins=[ZSCLPlugin(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), TEXTS)])
    with pytest.raises(ValueError, match="text tower"):
        strategy.train(tiny_benchmark().train_stream[0], eval_streams=[])


def test_zscl_text_side_term_on_transposed_logits():
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    plugin = ZSCLPlugin(images, TEXTS, ref_batch_size=5, text_loss=True, weight_ensemble=False)
    _, initial, rows = _train(plugin)
    teacher, student = tiny_clip_vit(4).eval(), tiny_clip_vit(4)
    teacher.load_state_dict(initial)
    row = rows[-1]
    student.load_state_dict(row["state"])
    with torch.no_grad():
        tokens = teacher.tokenizer(TEXTS)
        t_text = F.normalize(teacher.encode_text(tokens), dim=-1)
        s_text = F.normalize(student.encode_text(tokens), dim=-1)
        scale = teacher.clip.logit_scale.exp()
        t_img = F.normalize(teacher(row["ref"]), dim=-1)
        s_img = F.normalize(student(row["ref"]), dim=-1)
        image_term = soft_cross_entropy(scale * s_img @ t_text.T, scale * t_img @ t_text.T, 2.0)
        text_term = soft_cross_entropy(scale * s_text @ t_img.T, scale * t_text @ t_img.T, 2.0)
    assert (row["loss"] - row["ce"]).item() == pytest.approx((image_term + text_term).item(), rel=1e-4)
    assert text_term.item() > 0
