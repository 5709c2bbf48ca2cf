"""The per-task split option: the MTIL datasets on CoOp's split_zhou lists (tasks/coop.py, DIKI's data)
beside ZSCL's splits of the same datasets; sequences and the diki-mtil-fs protocol name them."""
import json

import pytest

import tasks
import tests.dataset_fixtures as fx
from benchmark.config import resolve
from tasks.loading import load_split


def test_a_coop_task_reads_its_split_lists_and_class_names(tmp_path):
    made = fx.coop_dtd(tmp_path)
    tasks.clear_memory()
    found = tasks.loaded_task("dtd_coop", str(tmp_path))
    assert found.classes == tuple(made["names"]) and found.source_classes[0] == "banded_00"
    assert {s: len(found.splits[s]) for s in ("train", "val", "test")} == {"train": 94, "val": 47, "test": 47}
    val = load_split("dtd_coop", "val", 32, str(tmp_path), None, 0, str(tmp_path / "cache"))
    assert (fx.labels_from_pixels(val.x.numpy()) == val.y.numpy()).all()  # each image beside its own label
    assert val.y.tolist() == [y for _, y, _ in made["lists"]["val"]]  # the list's own validation split
    assert tasks.get_task("dtd_coop").templates == tasks.get_task("dtd").templates
    assert set(tasks.SEQUENCES["mtil-fs-diki"].tasks) >= {"dtd_coop", "caltech101_coop", "aircraft", "cifar100"}


@pytest.mark.parametrize("change, message", [
    (lambda lists: lists.pop("val"), "no 'val' list"),
    (lambda lists: lists["train"].append(["x.jpg", 47, "extra"]), "label 47"),
    (lambda lists: lists["test"].append(["../../etc/passwd", 0, "banded_00"]), "not a path inside"),
    (lambda lists: lists["train"].append(["a.jpg", "0", "banded_00"]), "must be \\[path, label, class name\\]"),
])
def test_a_broken_split_list_is_one_line_naming_it(tmp_path, change, message):
    made = fx.coop_dtd(tmp_path, (1, 1, 1))
    change(made["lists"])
    (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").write_text(json.dumps(made["lists"]))
    tasks.clear_memory()
    with pytest.raises(tasks.DataUnavailable, match=message):
        tasks.loaded_task("dtd_coop", str(tmp_path))


def test_without_its_list_the_task_says_where_the_list_comes_from(tmp_path):
    tasks.clear_memory()
    status, detail, _ = tasks.task_status("dtd_coop", str(tmp_path))
    assert status == "missing" and "dtd/{images/, split_zhou_DescribableTextures.json} (CoOp" in detail


def test_diki_protocols_name_their_splits():
    """diki-mtil-fs trains on CoOp's lists; zscl-mtil's diki row on ZSCL's (a row changes how, not what)."""
    fs = resolve({"protocol": "diki-mtil-fs"})
    assert (fs.eval.templates, fs.eval.classnames) == ("diki", "diki")
    assert all(t in ("aircraft", "cifar100") or t.endswith("_coop") for t in tasks.SEQUENCES[fs.sequence].tasks)
    row = resolve({"protocol": "zscl-mtil"}).for_strategy("diki")
    assert row.sequence == "mtil-order1" and row.eval.templates == "diki"
