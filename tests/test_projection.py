"""`cfbench perf --projection`: the published split sizes, the projection's arithmetic against a
hand computation, the command end to end on a tiny model, and its one-line refusals."""
import json

import pytest
import torch

from benchmark.cli import main
from benchmark.config import load_config
from benchmark.config.plan import make_plan
from benchmark.models.factory import create_model
from benchmark.perf import projection as projection_module
from benchmark.perf.projection import HOURS, dataset_sizes, project, text
from benchmark.perf.projection.rates import Rates
from tasks import TASKS
from tasks.base import Task, published_counts


def test_every_task_publishes_train_and_test_counts():
    counts = {name: published_counts(task) for name, task in TASKS.items()}
    assert all(c["train"] > 0 and c["test"] > 0 for c in counts.values())
    assert counts["cars"] == {"train": 8144, "test": 8041}
    assert counts["eurosat"] == {"train": 16200, "val": 5400, "test": 5400}  # the one fixed val split
    assert counts["imagenet"] == {"train": 1281167, "test": 50000}  # "50,000 val (used as test)"
    assert counts["pets"]["train"] == 3680 and counts["sun397"]["train"] == 87000  # trainval; "~87,000"
    # the fixed val splits: EuroSAT's split files and CoOp's split lists (tasks/coop.py)
    assert [n for n, c in counts.items() if "val" in c] == ["eurosat", *[n for n in counts if n.endswith("_coop")]]
    assert counts["dtd_coop"] == {"train": 2820, "val": 1128, "test": 1692}
    with pytest.raises(ValueError, match="cannot read"):
        published_counts(Task("x", 2, lambda root: None, sizes="lots of images"))
    with pytest.raises(ValueError, match="no train and test"):
        published_counts(Task("x", 2, lambda root: None, sizes="10 train"))


def _rates() -> Rates:
    return Rates(train={"ft": 100.0}, official_train={"ft": 50.0}, extract=200.0, official_extract=80.0,
                 probe={"cars": 1e-7, "dtd": 2e-7, "aircraft": 5e-5}, official_probe={"cars": 3e-7, "dtd": 4e-7})


def test_ldifs_projection_matches_a_hand_computation_from_the_published_sizes():
    cfg = load_config(None, {"protocol": "ldifs", "tasks": ["cars", "dtd"]})
    result = project(cfg, make_plan(cfg), "ft", _rates())
    # cars: 8,144 train -> hold-out int(814.4) = 814 -> 7,330 train; 8,041 test; 35 epochs, batch 128
    # dtd: 1,880 train -> 188 held out -> 1,692; 1,880 test; 76 epochs
    assert (dataset_sizes("cars", cfg).train, dataset_sizes("dtd", cfg).probe_val) == (7330, 188)
    steps = {"cars": 35 * 58, "dtd": 76 * 14}  # ceil(7330 / 128) = 58, ceil(1692 / 128) = 14
    train = {"cars": 35 * 7330 / 100, "dtd": 76 * 1692 / 100}  # images / 100 img/s
    official_train = {"cars": 35 * 7330 / 50, "dtd": 76 * 1692 / 50}
    # one round: test + probe train + hold-out through the encoder at 200 img/s, and 1000 iterations of
    # 5 fits on the train features + the refit on train + hold-out (= the whole published train split)
    round_ = (8041 + 7330 + 814) / 200 + 1000 * 1e-7 * (5 * 7330 + 8144) \
        + (1880 + 1692 + 188) / 200 + 1000 * 2e-7 * (5 * 1692 + 1880)
    # official: train, hold-out, the whole train split and test twice at 80 img/s; the same fits
    official_round = (7330 + 814 + 8144 + 2 * 8041) / 80 + 1000 * 3e-7 * (5 * 7330 + 8144) \
        + (1692 + 188 + 1880 + 2 * 1880) / 80 + 1000 * 4e-7 * (5 * 1692 + 1880)
    lp_init = {"cars": 1000 * 1e-7 * 7330, "dtd": 1000 * 2e-7 * 1692}  # one fit on the round's features
    official_lp = {"cars": (2 * 7330 + 814) / 80 + 1000 * 3e-7 * 6 * 7330,
                   "dtd": (2 * 1692 + 188) / 80 + 1000 * 4e-7 * 6 * 1692}
    rows = [r.to_dict() for r in result.rows]
    assert [r["task"] for r in rows] == ["pretrained", "cars", "dtd"]
    assert rows[0] == pytest.approx({"task": "pretrained", "images": 0, "steps": 0, "train_h": 0.0,
                                     "eval_h": round_ / HOURS, "official_h": official_round / HOURS,
                                     "ratio": official_round / round_})
    for row, name, images in zip(rows[1:], ("cars", "dtd"), (7330, 1692)):
        official = official_train[name] + official_lp[name] + official_round
        assert row == pytest.approx({"task": name, "images": images, "steps": steps[name],
                                     "train_h": train[name] / HOURS, "eval_h": (lp_init[name] + round_) / HOURS,
                                     "official_h": official / HOURS,
                                     "ratio": official / (train[name] + lp_init[name] + round_)})
    total = result.total.to_dict()
    assert total["steps"] == 2030 + 1064
    assert total["train_h"] * HOURS == pytest.approx(2565.5 + 1285.92)
    assert total["eval_h"] * HOURS == pytest.approx(3 * round_ + lp_init["cars"] + lp_init["dtd"])


def test_iterations_trainval_and_the_sklearn_probe_under_zscl_mtil():
    """zscl-mtil: 1001 iterations of batch 64 on the whole train split, text heads (no LP-init), the
    sklearn probe capped at 100 per class; its official evaluation is one zero-shot pass over test."""
    cfg = load_config(None, {"protocol": "zscl-mtil", "tasks": ["aircraft"]})
    row = project(cfg, make_plan(cfg), "ft", _rates()).rows[1].to_dict()
    # aircraft: 3,334 train (all of it trains), probe on 3,334 - 333 = 3,001 (< 100 x 100 classes), 3,333 test
    eval_s = (3333 + 3001) / 200 + 5e-5 * 3001
    assert row == pytest.approx({"task": "aircraft", "images": 3334, "steps": 1001, "train_h": 1001 * 64 / 100 / HOURS,
                                 "eval_h": eval_s / HOURS, "official_h": (1001 * 64 / 50 + 3333 / 80) / HOURS,
                                 "ratio": (1001 * 64 / 50 + 3333 / 80) / (1001 * 64 / 100 + eval_s)})


def test_projection_command_runs_end_to_end_and_prints_json(tiny_clip_checkpoint, monkeypatch, capsys):
    """The whole command on a tiny CLIP (the protocol's own ViT-B/32 would take minutes here): every
    rate measured, every row projected from them, JSON that parses."""
    monkeypatch.setattr(projection_module, "random_encoder", lambda cfg: create_model("cfbench-tiny-vit", None))
    threads = torch.get_num_threads()
    try:  # one thread: two processes spinning on two shared cores make tiny steps 100x slower
        assert main(["perf", "--projection", "ldifs", "--samples", "4", "--device", "cpu", "--threads", "1",
                     "--json"]) == 0
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert result["header"]["scaled"] and result["header"]["device"].startswith("CPU")
    # ldifs10 at 224 px is 262 GB as raw squares: the run reads a compact cache, and so do the rates
    assert result["header"]["cache_format"] == "compact" and "(compact cache)" in err
    assert result["header"]["strategies"] == ["ft", "ldifs"] and "official training step, ldifs" in err
    rates = Rates(**result["rates"])
    assert all(v > 0 for v in [*rates.train.values(), *rates.official_train.values(), rates.extract,
                               rates.official_extract, *rates.probe.values(), *rates.official_probe.values()])
    cfg = load_config(None, {"protocol": "ldifs"})
    plan = make_plan(cfg)
    projections = [project(cfg, plan, s, rates) for s in ("ft", "ldifs")]
    for p in projections:
        rows = result["strategies"][p.strategy]["rows"]
        assert [r["task"] for r in rows] == ["pretrained", *plan.trained]
        assert rows == [pytest.approx(r.to_dict()) for r in p.rows]
        assert all(r["ratio"] > 0 for r in rows)
    memory, tiny = result["memory"], create_model("cfbench-tiny-vit", None)
    assert memory["train_measured_at"] == [2, 4] and memory["train_batch"] == 128
    # what stays on the device through a round: at least the weights, at most a whole training step
    weights = sum(p.numel() * 4 for p in tiny.parameters()) / 2 ** 30
    assert weights <= memory["resident_gib"] <= memory["train_gib"]["ldifs"]
    # LDIFS's step holds the previous task's encoder on top of everything FT's step holds
    assert 0 < memory["train_gib"]["ft"] < memory["train_gib"]["ldifs"]
    probe = memory["probe"]  # ImageNet's train split less the hold-out: the largest features and logits
    assert (probe["dataset"], probe["features"], probe["classes"]) == ("imagenet", 1_261_167, 1000)
    # at least the features, their normalized copy, the logits and the logits' gradient, in fp32
    assert probe["gib"] >= 1_261_167 * (2 * probe["width"] + 2 * 1000) * 4 / 2 ** 30
    floor = result["compute_floor"]  # the ldifs protocol trains in fp32
    assert floor["precision"] == "fp32" and floor["datasheet_tflops"] == {"H100 SXM": 67.0, "A100 SXM": 19.5}
    assert 0 < floor["train_flops"]["ft"] < floor["train_flops"]["ldifs"] < floor["flops"]["ldifs"]
    assert floor["hours"]["ft"]["H100 SXM"] == pytest.approx(floor["flops"]["ft"] / 67e12 / 3600)
    table = text(result, projections)
    assert "compute floor at a GPU's datasheet peak (fp32 TFLOP/s in brackets): ft " in table
    assert "peak memory of a training step at batch 128: ft" in table and "on imagenet (1,261,167 x" in table
    assert table.startswith("# cfbench perf --projection ldifs: CPU") and "scaled linearly" in table
    assert "\nimagenet " in table and "\ntotal " in table and "ratio" in table


@pytest.mark.parametrize("argv, message", [
    (["--projection", "nope"], "unknown protocol 'nope'"),
    (["--projection", "ldifs", "--strategy", "ft,nope"], "unknown strategy 'nope'"),
    (["--projection", "ldifs", "--samples", "0"], "must be at least 1"),
    (["--projection", "ldifs", "--model", "RN50"], "--model does not go with it"),
    (["--projection", "zscl-mtil", "--strategy", "zscl"], "reads its reference images from a dataset"),
    (["--projection", "demo", "--strategy", "flyp"], "needs a text tower"),
    (["--json"], "--json goes with --projection"),
])
def test_projection_refuses_bad_input_in_one_line(argv, message, capfd):
    try:
        rc = main(["perf", *argv])
    except SystemExit as exit_:  # argparse's own
        rc = exit_.code
    out, err = capfd.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and out == "" and len(lines) == 1, err
    assert lines[0].startswith("cfbench: error:") and message in lines[0]
