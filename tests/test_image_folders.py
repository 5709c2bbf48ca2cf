"""Your own dataset: `image_folders: {name: folder}` makes a train/<class>/, test/<class>/ folder a
task that `--check`, `data check` and a whole run (matrices, metrics) read like any other."""
from __future__ import annotations

import numpy as np
import pytest
import yaml
from PIL import Image
from sklearn.datasets import load_digits

import tasks

from benchmark.cli import main
from benchmark.errors import CfbenchError
from benchmark.evaluation.matrix import Matrix
from tests.helpers import THREADS


def _digit_folder(root, classes=(0, 1, 2), per_class=(12, 6)) -> str:
    """Real images (sklearn's 8x8 digits, upscaled to 32 px PNGs) by split and class."""
    digits = load_digits()
    for split, count in zip(("train", "test"), per_class):
        for c in classes:
            folder = root / split / f"digit_{c}"
            folder.mkdir(parents=True)
            picks = np.flatnonzero(digits.target == c)[:count] if split == "train" else \
                np.flatnonzero(digits.target == c)[-count:]
            for i in picks:
                pixels = (digits.images[i] * 255 / 16).astype(np.uint8)
                Image.fromarray(pixels).resize((32, 32)).save(folder / f"{i}.png")
    (root / "train" / "notes.txt").write_text("not a class folder")  # files beside classes are ignored
    return str(root)


def test_a_folder_is_a_task_a_run_trains_and_evaluates(tmp_path, capsys):
    folder = _digit_folder(tmp_path / "mydigits")
    config = tmp_path / "mine.yaml"
    config.write_text(yaml.safe_dump({
        "image_folders": {"mydigits": folder}, "tasks": ["mydigits", "faces"], "eval_only": ["photo_patches"],
        "strategies": ["ft"], "model": {"image_size": 32}, "figures": False, "threads": THREADS,
        "train": {"epochs": 1, "batch_size": 8, "warmup_steps": 1, "max_train_per_class": 8},
        "eval": {"probe_max_per_class": 6, "test_max_per_class": 5}, "out": str(tmp_path / "out")}))
    assert main(["data", "check", "--tasks", "mydigits"]) == 2  # only a run config names the folder
    assert "unknown task 'mydigits'" in capsys.readouterr().err
    assert main(["run", str(config), "--check"]) == 0
    assert "checked: trains mydigits -> faces" in capsys.readouterr().out
    assert main(["run", str(config)]) == 0
    (run,) = (tmp_path / "out").glob("*/ft-s0")
    lp = Matrix.load(run / "matrices/lp.csv")
    assert lp.rows == ["pretrained", "mydigits", "faces"] and lp.columns == ["mydigits", "faces", "photo_patches"]
    assert 0 <= lp.values[1][0] <= 100 and yaml.safe_load((run / "config.yaml").read_text())["image_folders"] == \
        {"mydigits": folder}
    assert tasks.task_classes("mydigits") == ("digit 0", "digit 1", "digit 2")  # the folders' names, readable
    assert tasks.task_classes("mydigits", source=True) == ("digit_0", "digit_1", "digit_2")


def test_what_is_wrong_with_a_folder_is_one_line(tmp_path, capsys):
    from benchmark.config import load_config

    def check(folders: dict) -> str:
        config = tmp_path / "c.yaml"
        config.write_text(yaml.safe_dump({"image_folders": folders, "tasks": list(folders), "eval_only": [],
                                          "out": str(tmp_path / "out")}))
        assert main(["run", str(config), "--check"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        return err[0]

    assert f"nowhere: missing: {tmp_path / 'nowhere'} has no train/ and test/ folders; expected " \
           f"{tmp_path / 'nowhere'}/train/<class>/" in check({"nowhere": str(tmp_path / "nowhere")})
    odd = _digit_folder(tmp_path / "odd")
    (tmp_path / "odd" / "test" / "digit_9").mkdir()
    assert "test has classes that train/ lacks: digit_9" in check({"odd": odd})
    with pytest.raises(CfbenchError, match="'cars' is a built-in task"):
        load_config(None, {"image_folders": {"cars": odd}})
    assert not (tmp_path / "out").exists()
