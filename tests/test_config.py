import pytest

from benchmark.config import DEFAULTS, apply_overrides, load_config
from benchmark.errors import CfbenchError


def test_unknown_keys_and_bad_values_are_rejected(tmp_path):
    with pytest.raises(CfbenchError, match="unknown key 'train.lrr'"):
        apply_overrides(DEFAULTS, {"train": {"lrr": 1}})
    with pytest.raises(CfbenchError, match="train.lr must be a positive number"):
        apply_overrides(DEFAULTS, {"train": {"lr": -1}})
    with pytest.raises(CfbenchError, match="must be a mapping"):
        apply_overrides(DEFAULTS, {"model": "ViT-B-32"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(CfbenchError, match="not valid YAML"):
        load_config(str(bad))


def test_strategy_params_merge_per_strategy():
    cfg = apply_overrides(DEFAULTS, {"strategy_params": {"ewc": {"ewc_lambda": 5.0}}})
    assert cfg["strategy_params"] == {"ldifs": {"alpha": 10000.0}, "ewc": {"ewc_lambda": 5.0}}
    cfg = apply_overrides(DEFAULTS, {"strategy_params": {"ldifs": {"alpha": 10.0}}})
    assert cfg["strategy_params"]["ldifs"] == {"alpha": 10.0}
