import numpy as np
import pytest
import torch

from benchmark.errors import CfbenchError
from tasks import get_task, resolve_sequence, task_status
from tasks.loading import load_split


@pytest.mark.parametrize("name,n_classes", [("mnist5k", 10), ("digits", 10), ("photo_patches", 14), ("faces", 2)])
def test_offline_tasks_load_real_data(name, n_classes):
    train, val, test = (load_split(name, s, 32) for s in ("train", "val", "test"))
    assert get_task(name).num_classes == n_classes
    for split in (train, val, test):
        assert split.x.dtype == torch.uint8 and split.x.shape[1:] == (3, 32, 32)
        assert set(split.y.unique().tolist()) == set(range(n_classes))
    # validation is int(10 %) of the source train split (the official code's hold-out)
    assert len(val) == int(0.1 * (len(train) + len(val)))
    assert split.x.float().std() > 10  # real images, not constant


def test_mnist5k_sizes_and_cap():
    assert len(load_split("mnist5k", "test", 32)) == 1000
    assert len(load_split("mnist5k", "train", 32)) + len(load_split("mnist5k", "val", 32)) == 4000
    capped = load_split("mnist5k", "train", 32, max_per_class=7)
    assert torch.equal(capped.y.bincount(), torch.full((10,), 7))


def test_photo_patches_train_and_test_come_from_different_rows(monkeypatch):
    import tasks.offline as offline

    raw = offline._load_photo_patches(None).splits
    assert len(raw["train"].labels) == 14 * 80 and len(raw["test"].labels) == 14 * 40
    assert raw["train"].images.shape[1:] == (32, 32, 3)
    # with an image whose pixels hold their row index, train rows < 60 % <= test rows
    rows = np.repeat(np.arange(200, dtype=np.uint8)[:, None, None], 3, axis=2).repeat(150, axis=1)
    monkeypatch.setattr(offline, "_photo", lambda name: rows)
    fake = offline._load_photo_patches(None).splits
    assert fake["train"].images.max() < 120 and fake["test"].images.min() >= 120


def test_unknown_task_and_missing_data_are_clear(tmp_path, monkeypatch):
    with pytest.raises(CfbenchError, match="unknown task 'nope'"):
        get_task("nope")
    import tasks.offline as offline

    monkeypatch.setattr(offline, "FASHION_DIR", str(tmp_path / "absent"))
    status, why, _ = task_status("fashion_mnist", str(tmp_path))
    assert status == "missing" and "fashion-mnist" in why and "t10k-images-idx3-ubyte.gz" in why


def test_demo_sequence_falls_back_without_fashion(tmp_path, monkeypatch):
    import tasks.offline as offline

    monkeypatch.setattr(offline, "FASHION_DIR", str(tmp_path / "absent"))
    assert resolve_sequence("demo", str(tmp_path)).tasks == ("mnist5k", "digits")


def test_foolbox_samples_load_as_real_labelled_images():
    test = load_split("foolbox_imagenet", "test", 32)
    assert len(test) == 10 and test.x.dtype == torch.uint8 and test.x.float().std() > 20
    # labels come from the file names (<dataset>_<nn>_<label>): foolbox's odd-numbered samples
    assert test.y.tolist() == [559, 990, 853, 609, 455, 630, 471, 99, 22, 305]
    from tasks import task_classes

    assert task_classes("foolbox_imagenet")[559] == "folding chair"
    assert len(load_split("foolbox_cifar10", "test", 32)) == 10
