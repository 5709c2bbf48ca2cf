"""Every example in configs/ is a config cfbench accepts: the offline ones pass `--check` (the sweep
its `--dry-run`); the ones that need data, weights or files only a user has print their resolved
config, and their `--check` finds nothing wrong but those."""
from __future__ import annotations

from pathlib import Path

import huggingface_hub.constants
import pytest
import yaml

from benchmark.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
OFFLINE = ("smoke.yaml",)
NEEDS_THE_USERS = ("ldifs-gpu-three-datasets.yaml", "local-clip-checkpoint.yaml", "zscl-mtil.yaml", "own-images.yaml")
# what only a user's machine has: a dataset, cached weights, their checkpoint or captions file
USERS_OWN = (": missing: nothing", "weights are not cached", "no such checkpoint file", "cc_captions.txt",
             "has no train/ and test/ folders")


@pytest.fixture
def bare_machine(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CFBENCH_DATA", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)


def test_every_example_is_listed_here():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(OFFLINE + NEEDS_THE_USERS + ("sweep.yaml",))


@pytest.mark.parametrize("name", OFFLINE)
def test_offline_examples_pass_the_check(name, bare_machine, capsys):
    assert main(["run", str(CONFIGS / name), "--check"]) == 0
    assert "checked: trains" in capsys.readouterr().out


def test_the_sweep_example_expands_without_writing(bare_machine, tmp_path, capsys):
    assert main(["sweep", str(CONFIGS / "sweep.yaml"), "--dry-run", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    runs = [line.split()[0] for line in out.splitlines()[2:] if line.startswith(("ft-", "ldifs-"))]
    assert runs == ["ft-s0", "ft-s1", "ldifs-alpha1000-s0", "ldifs-alpha1000-s1", "ldifs-alpha10000-s0",
                    "ldifs-alpha10000-s1"], out
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", NEEDS_THE_USERS)
def test_examples_for_a_users_machine_resolve_and_lack_only_what_the_user_supplies(name, bare_machine, capsys):
    """--print-config prints the whole config, then refuses exactly what --check refuses."""
    assert main(["run", str(CONFIGS / name), "--print-config"]) == 2
    printed_run = capsys.readouterr()
    printed = yaml.safe_load(printed_run.out)
    given = yaml.safe_load((CONFIGS / name).read_text())
    for key in ("protocol", "strategies", "tasks", "device"):
        if key in given:
            assert printed[key] == given[key], key
    assert main(["run", str(CONFIGS / name), "--check"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert printed_run.err.splitlines() == err
    problems = err[1:] if err[0].endswith("problems:") else [err[0]]
    assert problems and all(any(own in line for own in USERS_OWN) for line in problems), err
