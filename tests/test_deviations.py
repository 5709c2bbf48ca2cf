"""A run states how it differs from its protocol: config layers merge key by key, deviations.json,
the start-up log line, --print-config's comment and compare's protocol column."""
import csv
import json

import pytest
import yaml

import benchmark.config.protocols as config
from benchmark.cli import main
from benchmark.config import resolve
from benchmark.config.deviations import Deviation, protocol_deviations, summary
from benchmark.run.runner import run_strategy
from tests.helpers import THREADS, tiny_layer


def test_a_strategy_mapping_merges_key_by_key_over_the_protocol():
    cfg = resolve({"protocol": "zscl-mtil", "strategy_params": {"zscl": {"reference_texts": "cc.txt"}}})
    zscl = cfg.strategy_params["zscl"]
    assert zscl["text_loss"] is True and zscl["l2"] == 1.0 and zscl["reference_task"] == "imagenet"
    assert zscl["reference_texts"] == "cc.txt" and zscl["avg_freq"] == 100
    assert cfg.strategy_params["wise-ft"] == {"beta": 0.8}  # the other strategies' values stay too
    # per-task maps merge the same way; a plain value replaces the map
    ldifs = resolve({"protocol": "ldifs", "train": {"epochs": {"cars": 5}}})
    assert ldifs.train.epochs["cars"] == 5 and ldifs.train.epochs["dtd"] == 76
    mtil = resolve({"protocol": "zscl-mtil", "train": {"lr": {"default": 2e-5}}})
    assert mtil.train.lr == {"default": 2e-5, "aircraft": 5e-5, "mnist": 5e-5}
    assert resolve({"protocol": "ldifs", "train": {"epochs": 3}}).train.epochs == 3


def test_print_config_shows_the_documented_zscl_set_up_whole_and_its_deviations(tmp_path, capsys):
    path = tmp_path / "z.yaml"
    path.write_text(yaml.safe_dump({"protocol": "zscl-mtil", "strategy_params": {"zscl": {"reference_texts": "cc.txt"}}}))
    assert main(["run", str(path), "--print-config"]) == 2  # its data and cc.txt are not here
    out = capsys.readouterr().out
    printed = yaml.safe_load(out)  # the deviations are comments: the output is still a config file
    assert printed["strategy_params"]["zscl"] == {
        "reference_task": "imagenet", "reference_texts": "cc.txt", "temperature": 2.0, "weight": 1.0,
        "text_loss": True, "l2": 1.0, "avg_freq": 100, "ref_batch_size": 64, "weight_ensemble": True}
    assert out.rstrip().endswith("# protocol zscl-mtil, no changes")
    assert main(["run", "--protocol", "ldifs", "--tasks", "mnist,eurosat", "--epochs", "3", "--print-config"]) == 2
    tail = capsys.readouterr().out.rstrip().splitlines()[-4:]
    assert tail == ["# protocol ldifs, 3 changes:",
                    "#   tasks [cars, cifar10, cifar100, dtd, eurosat, gtsrb, mnist, resisc45, svhn, imagenet] → "
                    "[mnist, eurosat]",
                    "#   train.epochs.mnist 10 → 3", "#   train.epochs.eurosat 12 → 3"]


def test_deviations_name_each_changed_setting_and_skip_the_machine():
    cfg = resolve({"protocol": "ldifs", "train": {"epochs": {"cars": 5}},
                   "strategy_params": {"ldifs": {"alpha": 100, "cache_budget_mb": 10.0}, "l2sp": {"alpha": 3.0}},
                   "device": "cpu", "threads": 1, "data_root": "/elsewhere", "cache_dir": "/tmp/c", "out": "x",
                   "loggers": ["csv"], "seed": 7, "cache_format": "compact"})
    found = protocol_deviations(cfg, ["ldifs"])  # l2sp does not run: its alpha is not this run's
    assert found == [Deviation("strategy_params.ldifs.alpha", 10.0, 100.0), Deviation("train.epochs.cars", 35, 5)]
    assert summary(cfg, found[::-1]) == \
        "protocol ldifs, 2 changes: train.epochs.cars 35 → 5, strategy_params.ldifs.alpha 10 → 100"
    assert protocol_deviations(cfg, ["l2sp"])[0] == Deviation("strategy_params.l2sp.alpha", 0.5, 3.0)
    assert protocol_deviations(resolve({})) == []  # the demo is its protocol
    assert protocol_deviations(resolve({"protocol": "ldifs"})) == []
    # a strategy the protocol does not mention is compared with its own defaults
    assert protocol_deviations(resolve({"strategy_params": {"ewc": {"ewc_lambda": 1.0}}}), ["ewc"]) == \
        [Deviation("strategy_params.ewc.ewc_lambda", 100.0, 1.0)]


def test_zscls_captions_file_is_part_of_its_protocol():
    without = protocol_deviations(resolve({"protocol": "zscl-mtil"}), ["zscl"])
    assert [(d.key, d.run) for d in without] == [("strategy_params.zscl.reference_texts", None)]
    assert "Conceptual Captions" in without[0].protocol
    given = resolve({"protocol": "zscl-mtil", "strategy_params": {"zscl": {"reference_texts": "cc.txt"}}})
    assert protocol_deviations(given, ["zscl"]) == []
    assert protocol_deviations(resolve({"protocol": "zscl-mtil"}), ["ft"]) == []  # FT has no captions to give


@pytest.fixture
def tiny_protocol(tmp_path, monkeypatch):
    """A protocol whose preset is the tiny offline run (the real ones take minutes to hours)."""
    folder = tmp_path / "protocols"
    folder.mkdir()
    settings = {**{k: v for k, v in tiny_layer(tmp_path).items() if k not in ("out", "threads")},
                "tasks": ["digits"], "eval_only": [], "model": {"image_size": 32},
                "train": {"epochs": 1, "max_train_per_class": 8, "batch_size": 16, "warmup_steps": 2},
                "eval": {"probe_max_per_class": 6, "test_max_per_class": 5}, "figures": False}
    (folder / "tiny.yaml").write_text(yaml.safe_dump({"description": "tests", "settings": settings}))
    monkeypatch.setattr(config, "PROTOCOL_DIR", folder)
    return {"protocol": "tiny", "out": str(tmp_path / "results"), "threads": THREADS}


def test_runs_write_their_deviations_and_compare_shows_them(tiny_protocol, tmp_path, capsys):
    exact = run_strategy(resolve(tiny_protocol), "ft", tmp_path / "exact")
    changed = run_strategy(resolve(tiny_protocol, {"train": {"lr": 2e-3}}), "ft", tmp_path / "changed")
    assert json.loads((exact / "deviations.json").read_text()) == []
    assert json.loads((changed / "deviations.json").read_text()) == [{"key": "train.lr", "protocol": 1e-3,
                                                                       "run": 2e-3}]
    assert "protocol tiny, no changes" in (exact / "log.txt").read_text()
    assert "protocol tiny, 1 change: train.lr 0.001 → 0.002" in (changed / "log.txt").read_text()
    out = tmp_path / "cmp"
    assert main(["compare", str(exact), str(changed), "--out", str(out), "--latex"]) == 0
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert [(r["run"], r["protocol"]) for r in rows] == [("exact", "tiny"), ("changed", "tiny + 1 change")]
    tex = (out / "comparison.tex").read_text()
    assert r"changed$^\dagger$ & ft & tiny + 1 change" in tex and r"exact & ft & tiny &" in tex
    assert "differs from its protocol" in tex
