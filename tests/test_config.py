import pytest
import yaml

from benchmark.cli import main
from benchmark.config import RunConfig, dump_config, list_protocols, load_config, protocol_settings, resolve
from benchmark.config.overrides import override_layer
from benchmark.errors import CfbenchError


def test_unknown_keys_and_bad_values_are_rejected(tmp_path):
    with pytest.raises(CfbenchError, match="unknown key 'train.lrr'"):
        resolve({"train": {"lrr": 1}})
    with pytest.raises(CfbenchError, match="train.lr must be positive"):
        resolve({"train": {"lr": -1}})
    with pytest.raises(CfbenchError, match="'model' must be a mapping"):
        resolve({"model": "ViT-B-32"})
    with pytest.raises(CfbenchError, match="train.batch_size must be an integer"):
        resolve({"train": {"batch_size": "64"}})
    with pytest.raises(CfbenchError, match="train.head_init must be one of"):
        resolve({"train": {"head_init": "random"}})
    with pytest.raises(CfbenchError, match="train.augment.scale must satisfy"):
        resolve({"train": {"augment": {"kind": "rrc", "scale": [0.5, 1.5]}}})
    with pytest.raises(CfbenchError, match="train.epochs must be"):
        resolve({"train": {"epochs": [1, 2]}})
    with pytest.raises(CfbenchError, match="unknown protocol 'nope'"):
        resolve({"protocol": "nope"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(CfbenchError, match="not valid YAML"):
        load_config(str(bad))


def test_layers_apply_in_order_and_strategy_params_merge_per_strategy():
    cfg = resolve({"strategy_params": {"ewc": {"ewc_lambda": 5.0}}})
    assert cfg.strategy_params == {"ldifs": {"alpha": 10000.0}, "ewc": {"ewc_lambda": 5.0}}  # demo preset kept
    cfg = resolve({"strategy_params": {"ldifs": {"alpha": 10.0}}}, {"train": {"lr": 2e-3}})
    assert cfg.strategy_params["ldifs"] == {"alpha": 10.0} and cfg.train.lr == 2e-3
    assert isinstance(cfg.train.lr, float) and cfg.train.batch_size == 64  # untouched keys keep the preset


def test_ldifs_protocol_preset_and_user_overrides():
    cfg = resolve({"protocol": "ldifs"})
    assert (cfg.model.name, cfg.model.pretrained, cfg.sequence) == ("ViT-B-32", "openai", "ldifs10")
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.batch_size, cfg.train.warmup_steps) == (1e-5, 0.1, 128, 500)
    assert cfg.train.grad_clip == 1.0 and cfg.train.augment.kind == "rrc" and cfg.train.augment.scale == (0.9, 1.0)
    assert cfg.train.epochs_for("dtd") == 76 and cfg.train.epochs_for("cars") == 35
    assert cfg.train.max_train_per_class is None and cfg.eval.probe_max_per_class is None
    assert (cfg.eval.probe, cfg.eval.zs_text, cfg.eval.templates) == ("official", "pretrained", "ldifs")
    with pytest.raises(CfbenchError, match="train.epochs names no value for task 'digits'"):
        cfg.train.epochs_for("digits")
    # a user key overrides the preset, the rest of the preset stays
    cfg = resolve({"protocol": "ldifs", "train": {"epochs": 2, "batch_size": 8}})
    assert cfg.train.epochs_for("digits") == 2 and cfg.train.lr == 1e-5 and cfg.train.batch_size == 8
    assert resolve({"train": {"epochs": {"digits": 4, "default": 1}}}).train.epochs_for("faces") == 1


def test_every_protocol_resolves_and_round_trips_through_yaml(tmp_path):
    assert {"demo", "ldifs"} <= set(list_protocols())
    for name in list_protocols():
        assert list_protocols()[name]  # each has a description
        cfg = resolve({"protocol": name})
        path = tmp_path / f"{name}.yaml"
        path.write_text(dump_config(cfg))
        assert load_config(str(path)) == cfg
        # a preset names every setting of the sections it fills (no silent schema default)
        settings = protocol_settings(name)
        for section in ("model", "train", "eval"):
            assert set(settings[section]) == set(RunConfig().to_dict()[section]), (name, section)


def test_print_config_prints_the_resolved_yaml_and_writes_nothing(tmp_path, capsys):
    """The config first, then --check's checks: here the ldifs protocol's data and weights are not on
    this machine, so it ends in exit 2 naming them, after a complete config."""
    out = tmp_path / "results"
    assert main(["run", "--protocol", "ldifs", "--print-config", "--out", str(out), "--epochs", "2"]) == 2
    captured = capsys.readouterr()
    assert "problems:" in captured.err and "cfbench data download" in captured.err
    printed = yaml.safe_load(captured.out)
    assert printed["protocol"] == "ldifs" and printed["train"]["epochs"] == 2
    assert printed["train"]["lr"] == 1e-5 and printed["model"]["name"] == "ViT-B-32"
    assert RunConfig().to_dict().keys() == printed.keys()
    assert not out.exists()


def test_list_protocols(capsys):
    assert main(["list", "protocols"]) == 0
    out = capsys.readouterr().out
    assert "ldifs" in out and "demo (default)" in out and "--print-config" in out


def test_command_line_settings_are_typed_as_yaml_and_laid_over_the_file(tmp_path, capsys):
    """`run [CONFIG] KEY=VALUE ...`: the sweeps' dotted keys; 1e-4 is a number (YAML 1.2, not 1.1's
    string); a per-task map is one value; the flags are laid over both."""
    config = tmp_path / "c.yaml"
    config.write_text("train: {lr: 1e-3, batch_size: 8}\nseed: 3\n")
    assert main(["run", str(config), "train.lr=1e-4", "strategy_params.ldifs.alpha=100", "eval_only=[]",
                 "train.epochs={digits: 2, default: 1}", "seed=5", "--seed", "7", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["lr"] == 1e-4 and printed["train"]["batch_size"] == 8
    assert printed["train"]["epochs"] == {"digits": 2, "default": 1}
    assert printed["strategy_params"]["ldifs"]["alpha"] == 100 and printed["eval_only"] == []
    assert printed["seed"] == 7
    assert load_config(str(config)).train.lr == 1e-3  # the exponent without a dot, in a file too


def test_command_line_settings_may_follow_the_flags(tmp_path, capsys):
    """`run CONFIG --seed 7 train.lr=1e-4` as `run CONFIG train.lr=1e-4 --seed 7` (argparse alone refused
    a positional after an option: "unrecognized arguments"); anything else after the flags still is."""
    config = tmp_path / "c.yaml"
    config.write_text("train: {lr: 1e-3}\n")
    assert main(["run", str(config), "--seed", "7", "train.lr=1e-4", "--print-config", "figures=false"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["lr"] == 1e-4 and printed["seed"] == 7 and printed["figures"] is False
    assert main(["run", str(config), "--seed", "7", str(config), "--print-config"]) == 2
    assert "run takes one config file, not 2" in capsys.readouterr().err
    for argv, unknown in ((["run", str(config), "--print-config", "--sed", "7"], "--sed 7"),
                          (["run", str(config), "--print-config", "-x"], "-x"),
                          (["list", "strategies", "train.lr=1e-4"], "train.lr=1e-4")):  # settings are run's alone
        with pytest.raises(SystemExit) as exit_:  # argparse's one line
            main(argv)
        assert exit_.value.code == 2 and f"unrecognized arguments: {unknown} " in capsys.readouterr().err


def test_sweep_axes_and_command_line_settings_share_one_path_check():
    from benchmark.config.overrides import override_layer

    assert override_layer(["model.image_size=32", "strategy_params.ewc.mode=online"]) == \
        {"model": {"image_size": 32}, "strategy_params": {"ewc": {"mode": "online"}}}
    with pytest.raises(CfbenchError, match="unknown setting 'model.size'.*'size' is no setting of model"):
        override_layer(["model.size=32"])


def test_rows_give_one_strategys_runs_their_own_settings_and_the_users_settings_win_where_given():
    """RunConfig.rows: zscl-mtil's moe-adapters row (its per-task lr) for that strategy alone, folded into
    its runs' config; a setting the user gives holds for every strategy, exactly where given."""
    from benchmark.config.deviations import protocol_deviations

    cfg = resolve({"protocol": "zscl-mtil"})
    assert cfg.for_strategy("moe-adapters").train.lr_for("eurosat_mtil") == 1e-4
    assert cfg.for_strategy("zscl").train.lr_for("eurosat_mtil") == 1e-5
    assert protocol_deviations(cfg.for_strategy("moe-adapters"), ["moe-adapters"]) == \
        protocol_deviations(cfg, ["moe-adapters"])  # a run's own config (row folded) against its row
    given = resolve({"protocol": "zscl-mtil"}, {"train": {"lr": {"mnist": 7e-3}}})
    moe = given.for_strategy("moe-adapters")
    assert (moe.train.lr_for("mnist"), moe.train.lr_for("aircraft")) == (7e-3, 5e-3)
    assert given.for_strategy("ft").train.lr_for("mnist") == 7e-3
    assert resolve({"protocol": "zscl-mtil"}, {"train": {"lr": 2e-4}}).for_strategy("moe-adapters").train.lr == 2e-4
    own = resolve({"protocol": "zscl-mtil"}, override_layer(["rows.moe-adapters.train.lr={mnist: 3e-3}"]))
    assert own.for_strategy("moe-adapters").train.lr_for("mnist") == 3e-3
    assert own.for_strategy("ft").train.lr_for("mnist") == 5e-5
    found = [d.key for d in protocol_deviations(own)]
    assert found == ["zscl: strategy_params.zscl.reference_texts", "moe-adapters: train.lr.mnist"], found
    with pytest.raises(CfbenchError, match="may set train, eval, strategy_params only"):
        resolve({"rows": {"ft": {"tasks": ["digits"]}}})
    with pytest.raises(CfbenchError, match="train.lr"):
        resolve({"rows": {"ft": {"train": {"lr": -1}}}})
    with pytest.raises(CfbenchError, match="rows.<strategy>"):
        override_layer(["rows.ft.tasks=[digits]"])
