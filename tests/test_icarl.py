"""`icarl`: ZSCL's iCaRL baseline against its official code (Thunderbeee/ZSCL, mtil/, commit b96e714).

`official_*` functions transcribe the official code (file:line in their docstrings)."""
import copy
import shutil

import numpy as np
import pytest

import torch
from avalanche.core import SupervisedPlugin
from avalanche.training import Naive

from strategies import STRATEGIES, BuildContext, build_plugins, resolve_params
from strategies.icarl import ExemplarImages, ICaRLPlugin, herding
from tests.test_plugins import model_with_heads, tiny_benchmark
from tests.test_zscl import official_distillation_terms

TEXTS = {0: ["a photo of a cat.", "a photo of a dog.", "a photo of a car."],
         1: ["a photo of a bus.", "a photo of a tree.", "a photo of a cup."]}


def tiny_images(t: int) -> torch.Tensor:
    """The images of tiny_benchmark()'s experience t (the same draws)."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=g) for _ in range(2)]
    return xs[t]


def official_construct_example_set(image_feature: np.ndarray, new_dataset: list, m: int) -> list:
    """dynamic_dataset.py:55-82 from the normalized features on: what update_dataset stores. In 2023
    (requirements.txt pins no NumPy: 1.x) the np.float64 factor 1/(k+1) multiplied the float32 array
    in float32 (value-based casting); NumPy 2 would upcast, so the factor is cast here."""
    image_feature_average = image_feature.mean(axis=0)
    update_dataset, cur_embedding_sum = [], None
    for k in np.arange(min(m, len(image_feature))):
        if not k:
            index = np.argmin(np.sum((image_feature_average - image_feature) ** 2, axis=1))
            cur_embedding_sum = image_feature[index]
            update_dataset.append(new_dataset[index])
            image_feature = np.delete(image_feature, index, axis=0)
        else:
            index = np.argmin(np.sum((image_feature_average - np.float32(1 / (k + 1)) * (
                image_feature + cur_embedding_sum)) ** 2, axis=1))
            cur_embedding_sum += image_feature[index]
            update_dataset.append(new_dataset[index])
            image_feature = np.delete(image_feature, index, axis=0)
    return update_dataset


def picked_features(image_feature: np.ndarray, m: int) -> list:
    """The same loop, returning the dataset positions of the features it picks (iCaRL as published)."""
    alive, picks, total = list(range(len(image_feature))), [], np.zeros_like(image_feature[0])
    mean = image_feature.mean(axis=0)
    for k in range(min(m, len(image_feature))):
        rest = image_feature[alive]
        index = int(np.argmin(np.sum((mean - np.float32(1 / (k + 1)) * (rest + total)) ** 2, axis=1)))
        total = total + rest[index]
        picks.append(alive.pop(index))
    return picks


def test_herding_equals_the_official_rule_on_known_features():
    rng = np.random.default_rng(3)
    f = rng.normal(size=(9, 4)).astype(np.float32)
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    official = official_construct_example_set(f.copy(), list(range(9)), 6)
    assert herding(torch.from_numpy(f), 6, "official").tolist() == official
    assert herding(torch.from_numpy(f), 6, "herding").tolist() == picked_features(f, 6)
    # the released code stores new_dataset[index], index counted in the shrinking feature array
    assert official != picked_features(f, 6)
    assert herding(torch.from_numpy(f), 20, "herding").sort().values.tolist() == list(range(9))  # min(m, n)


class Record(SupervisedPlugin):
    """Per step (after the iCaRL plugin): the loss, the cross-entropy alone, the weights, the exemplar batch."""

    def __init__(self, icarl):
        super().__init__()
        self.icarl, self.rows = icarl, []

    def before_backward(self, strategy, **kwargs):
        self.rows.append({"task": strategy.experience.current_experience, "loss": strategy.loss.detach().clone(),
                          "ce": strategy._criterion(strategy.mb_output, strategy.mb_y).detach(),
                          "state": copy.deepcopy(strategy.model.encoder.state_dict()),
                          "ref": self.icarl.last_reference_batch if self.icarl.active else None})


def test_icarl_loss_exemplar_batches_and_memory_equal_the_official_code():
    plugin = ICaRLPlugin(images_of=tiny_images, prompts_of=TEXTS.__getitem__, memory_size=5, ref_batch_size=2)
    model = model_with_heads(4)
    initial = copy.deepcopy(model.encoder.state_dict())
    record = Record(plugin)
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                     criterion=torch.nn.CrossEntropyLoss(), train_mb_size=6, train_epochs=2, plugins=[plugin, record])
    bench = tiny_benchmark()
    assert torch.equal(bench.train_stream[1].dataset[0][0], tiny_images(1)[0])
    for exp in bench.train_stream:
        strategy.train(exp, eval_streams=[])
    first = [r for r in record.rows if r["task"] == 0]
    second = [r for r in record.rows if r["task"] == 1]
    assert len(second) == 4 and all(r["loss"].item() == r["ce"].item() for r in first)  # task 1: plain FT (icarl.py:30)
    # the memory after task 1: its first K = 5 samples (dynamic_dataset.py:23-26), read in order 2 at a
    # time and from the start again (icarl.py:127, 171-175)
    for row, rows in zip(second, ([0, 1], [2, 3], [4], [0, 1])):
        assert torch.equal(row["ref"], tiny_images(0)[rows])
    for k, v in plugin.teacher.state_dict().items():
        assert torch.equal(v, initial[k]), k  # the teacher is the pretrained model, not the previous task's
    teacher, student = copy.deepcopy(model.encoder).eval(), copy.deepcopy(model.encoder)
    teacher.load_state_dict(initial)
    for row in second:
        student.load_state_dict(row["state"])
        # icarl.py:179-216: the zero-shot CLIP as teacher (:113-115), the task's prompts (:105-106, 129)
        with torch.no_grad():
            expected = official_distillation_terms(teacher, student, row["ref"], TEXTS[1], 2.0)
        assert (row["loss"] - row["ce"]).item() == pytest.approx(expected.item(), rel=1e-4)
        assert expected.item() > 0
    # after task 2 (num_tasks not given: the update runs): task 1 keeps its first K // 2, task 2 gets
    # K - K // 2 by herding on the trained model's normalized features (dynamic_dataset.py:32-82)
    with torch.no_grad():
        f = model.encoder.eval()(tiny_images(1)).float()
    f = (f / f.norm(dim=-1, keepdim=True)).numpy()
    assert [m.tolist() for m in plugin.memory] == [[0, 1], official_construct_example_set(f, list(range(12)), 3)]


def test_exemplar_images_read_each_task_in_order():
    a = torch.arange(6, dtype=torch.uint8).view(6, 1, 1, 1).expand(6, 3, 2, 2)
    b = (100 + torch.arange(4, dtype=torch.uint8)).view(4, 1, 1, 1).expand(4, 3, 2, 2)
    store = ExemplarImages([(a, torch.tensor([4, 0])), (b, torch.tensor([3, 3, 1]))])
    assert len(store) == 5
    assert store.gather(torch.tensor([4, 0, 1, 2]))[:, 0, 0, 0].tolist() == [101, 4, 0, 103]


def test_icarl_is_registered_with_the_official_defaults():
    spec = STRATEGIES["icarl"]
    assert spec.needs_text and spec.build == "icarl:build"
    assert spec.defaults == {"memory_size": 10000, "max_candidates": 30000, "selection": "official",
                             "temperature": 2.0, "weight": 1.0, "text_loss": True, "ref_batch_size": 64}
    from benchmark.errors import CfbenchError
    with pytest.raises(CfbenchError, match="selection must be one of official"):
        resolve_params("icarl", {"icarl": {"selection": "random"}})
    with pytest.raises(CfbenchError, match="memory_size must be >= 1"):
        resolve_params("icarl", {"icarl": {"memory_size": 0}})
    ctx = BuildContext(image_size=16, tasks=("digits", "faces"), template_of=lambda n: "a photo of {}.",
                       classes_of=lambda n: ["x", "y"])
    (plugin,) = build_plugins("icarl", resolve_params("icarl", {}), ctx)
    assert plugin.num_tasks == 2 and plugin.prompts_of(1) == ["a photo of x.", "a photo of y."]
    assert len(plugin.images_of(0)) > 0


def test_icarl_run_writes_matrices_and_resumes_exactly(tiny_clip_checkpoint, tmp_path, capsys):
    from benchmark.cli import main
    from benchmark.run.runner import run_strategy
    from tests.helpers import tiny_config

    path, _ = tiny_clip_checkpoint
    cfg = tiny_config(tmp_path, {
        "protocol": "zscl-mtil", "tasks": ["digits", "faces"], "eval_only": [],
        "strategies": ["icarl"], "model": {"name": "cfbench-tiny-vit", "pretrained": path, "image_size": None},
        "train": {"batch_size": 8, "iterations": 3, "schedule_steps": 2, "warmup_steps": 1, "max_train_per_class": 8},
        "eval": {"probe_max_per_class": 4, "test_max_per_class": 4, "templates": None, "classnames": None},
        "strategy_params": {"icarl": {"memory_size": 6, "max_candidates": 24, "ref_batch_size": 4}},
        "figures": False})
    full = run_strategy(cfg, "icarl", tmp_path / "full")
    part = run_strategy(cfg, "icarl", tmp_path / "part", stop_after=1)
    for i, memory in enumerate([[torch.tensor([0, 10 ** 6])], [torch.tensor([1, 1])], [torch.tensor([0.5])],
                                [torch.tensor([0]), torch.tensor([0])]]):  # a tampered memory: refused
        tampered = tmp_path / f"tampered{i}"
        shutil.copytree(part, tampered)
        state = torch.load(tampered / "checkpoints/state.pt", weights_only=True)
        state["plugins"][0]["memory"] = memory
        torch.save(state, tampered / "checkpoints/state.pt")
        assert main(["run", "--resume", str(tampered)]) == 2, memory
        assert "iCaRL's memory" in capsys.readouterr().err
    assert main(["run", "--resume", str(part)]) == 0
    for kind in ("zs", "lp", "head"):
        text = (full / f"matrices/{kind}.csv").read_text()
        assert text.count("\n") == 4 and text == (part / f"matrices/{kind}.csv").read_text(), kind
    states = [torch.load(run / "checkpoints" / "state.pt", weights_only=True) for run in (full, part)]
    for k, v in states[0]["model"].items():
        assert torch.equal(v, states[1]["model"][k]), k
    # the memory the resumed task 2 read came from the checkpoint: task 1's first K (none is built after the last)
    assert [[m.tolist() for m in s["plugins"][0]["memory"]] for s in states] == [[list(range(6))]] * 2
    assert all(torch.equal(v, states[1]["plugins"][0]["teacher"]["state"][k])
               for k, v in states[0]["plugins"][0]["teacher"]["state"].items())
