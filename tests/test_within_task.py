"""Forgetting measured during fine-tuning: `eval.within_task` evaluates at evenly spaced steps
inside every task and writes matrices/within_<kind>.csv and within_<kind>.png."""
import math

import pytest
import torch

from benchmark.cli import main
from benchmark.errors import CfbenchError
from benchmark.evaluation.matrix import Matrix
from benchmark.evaluation.within import Curve, within_points
from benchmark.report.compare import compare_runs
from benchmark.run.runner import run_strategy
from tests.helpers import tiny_config

SMALL = {"model": {"image_size": 32}, "train": {"max_train_per_class": 8, "batch_size": 16, "iterations": 6},
         "eval": {"probe_max_per_class": 6, "test_max_per_class": 5}}
WITHIN = {"eval": {"within_task": {"points": 3, "kinds": ["lp"]}}}


def test_points_are_evenly_spaced_and_end_at_the_last_step():
    assert within_points(10, 3) == [4, 7, 10]
    assert within_points(5, 5) == [1, 2, 3, 4, 5]
    assert within_points(2, 3) == [1, 2]  # fewer steps than points: every step
    assert within_points(1000, 100)[:3] == [10, 20, 30] and within_points(1000, 100)[-1] == 1000
    assert within_points(0, 3) == []


def test_curve_csv_round_trip_and_strict_reading(tmp_path):
    curve = Curve(["digits", "faces"])
    curve.add("pretrained", 0, 0, {"digits": 50.0, "faces": None})
    curve.add("digits", 4, 4, {"digits": 75.5, "faces": 12.25})
    path = tmp_path / "within_lp.csv"
    curve.save(path)
    assert path.read_text().splitlines() == ["task,step,global_step,digits,faces", "pretrained,0,0,50.0000,",
                                             "digits,4,4,75.5000,12.2500"]
    back = Curve.load(path)
    assert back.points == curve.points and back.columns == curve.columns and math.isnan(back.values[0][1])
    path.write_text("task,step,global_step,digits\npretrained,-1,0,50\n")
    with pytest.raises(CfbenchError, match="negative"):
        Curve.load(path)
    path.write_text("after,digits\npretrained,50\n")
    with pytest.raises(CfbenchError, match="header"):
        Curve.load(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """ft over two tasks: with curves, without, and with curves stopped after task 1 then resumed
    (the first alone draws its figures)."""
    tmp = tmp_path_factory.mktemp("within")
    with_curves = tiny_config(tmp, SMALL, WITHIN, {"eval_only": []})
    full = run_strategy(with_curves, "ft", tmp / "full")
    plain = run_strategy(tiny_config(tmp, SMALL, {"eval_only": [], "figures": False}), "ft", tmp / "plain")
    part = run_strategy(with_curves.replace(figures=False), "ft", tmp / "part", stop_after=1)
    partial = (part / "matrices/within_lp.csv").read_text()
    assert main(["run", "--resume", str(part)]) == 0
    return full, plain, part, partial


def test_two_tasks_three_points_give_six_rows_and_the_pretrained_one(runs):
    full, _, _, _ = runs
    curve = Curve.load(full / "matrices/within_lp.csv")
    lp = Matrix.load(full / "matrices/lp.csv")
    assert curve.columns == lp.columns == ["digits", "faces"]
    assert [p[0] for p in curve.points] == ["pretrained"] + ["digits"] * 3 + ["faces"] * 3
    # 6 steps per task: points after steps 2, 4 and 6 of each
    assert [p[1] for p in curve.points] == [0, 2, 4, 6, 2, 4, 6]
    assert [p[2] for p in curve.points] == [0, 2, 4, 6, 8, 10, 12]
    # the pretrained point is the matrix's pretrained row; the last point of a task is the model the
    # after-task evaluation sees (ft changes nothing after the last step)
    assert curve.values[0] == lp.values[0]
    assert curve.values[3] == lp.values[1] and curve.values[6] == lp.values[2]
    assert (full / "within_lp.png").stat().st_size > 1000
    assert not (full / "matrices/within_zs.csv").exists()


def test_curves_change_nothing_the_run_trains(runs):
    full, plain, _, _ = runs
    for kind in ("lp", "head"):
        assert (full / f"matrices/{kind}.csv").read_text() == (plain / f"matrices/{kind}.csv").read_text()
    a = torch.load(full / "checkpoints/state.pt", weights_only=True)["model"]
    b = torch.load(plain / "checkpoints/state.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_the_first_task_gives_the_uninterrupted_curve(runs):
    full, _, part, partial = runs
    assert len(partial.splitlines()) == 1 + 1 + 3  # header, pretrained, the first task's points
    assert (part / "matrices/within_lp.csv").read_text() == (full / "matrices/within_lp.csv").read_text()


def test_compare_overlays_the_runs_curves(runs, tmp_path):
    full, _, part, _ = runs
    compare_runs([full, part], tmp_path / "cmp")
    assert (tmp_path / "cmp" / "within_lp.png").stat().st_size > 1000


def test_zero_shot_curves_need_a_text_tower(tmp_path, capsys):
    config = tmp_path / "curves.yaml"
    config.write_text("eval:\n  within_task: {points: 2}\n")  # kinds default to [zs]; the demo model is a CNN
    assert main(["run", str(config), "--check", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "eval.within_task.kinds zs (zero-shot) needs a text tower" in err
    assert not (tmp_path / "out").exists()
