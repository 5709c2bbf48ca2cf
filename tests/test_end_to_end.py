"""A real run on a tiny real subset with the packaged pretrained encoder, through the CLI."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from benchmark.cli import main
from benchmark.config import TrainConfig, load_config
from benchmark.evaluation.matrix import Matrix
from benchmark.run.runner import run_strategy
from tasks.loading import load_split
from tests.helpers import THREADS, assert_resumed_run_is_the_uninterrupted_one, tiny_config

# the smallest run that still trains both offline tasks and probes every column
SMALL = {"model": {"image_size": 32}, "train": {"max_train_per_class": 8},
         "eval": {"probe_max_per_class": 6, "test_max_per_class": 5}, "figures": False}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One invocation with two strategies, shared by the tests below; two of its settings are
    given on the command line as KEY=VALUE (`test_command_line_settings_reach_config_yaml`)."""
    out = tmp_path_factory.mktemp("runs")
    cfg_path = out / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "tasks": ["digits", "faces"], "eval_only": ["photo_patches"], "strategies": ["ft", "ldifs"],
        "model": {"image_size": 64},
        "train": {"epochs": 1, "max_train_per_class": 16, "batch_size": 16},
        "eval": {"probe_max_per_class": 12, "test_max_per_class": 10},
        "out": str(out)}))
    assert main(["run", str(cfg_path), "train.warmup_steps=2", f"threads={THREADS}"]) == 0
    (invocation,) = [p for p in out.iterdir() if p.is_dir()]
    return invocation


def test_run_directory_layout_and_matrices(finished):
    for strategy in ("ft", "ldifs"):
        run = finished / f"{strategy}-s0"
        for name in ("config.yaml", "matrices/lp.csv", "matrices/head.csv", "metrics.json", "log.txt",
                     "heatmap_lp.png", "heatmap_head.png", "heatmap_delta_lp.png", "checkpoints/state.pt"):
            assert (run / name).is_file(), name
        lp = Matrix.load(run / "matrices/lp.csv")
        assert lp.rows == ["pretrained", "digits", "faces"]
        assert lp.columns == ["digits", "faces", "photo_patches"]
        values = lp.array()
        assert values.shape == (3, 3) and np.all((values >= 0) & (values <= 100))
        assert values[0, 0] > 40  # the pretrained encoder really separates 10 digit classes
        head = Matrix.load(run / "matrices/head.csv").array()
        # defined only once the task has been trained: lower triangle of the trained block
        assert np.isnan(head[0]).all() and np.isnan(head[1, 1]) and np.isnan(head[:, 2]).all()
        assert not np.isnan(head[1, 0]) and not np.isnan(head[2, :2]).any()
        assert json.loads((run / "progress.json").read_text())["finished"] is True
        assert not (run / ".lock").exists()  # a finished folder is shared without its lock


def test_deviations_list_exactly_what_the_tiny_config_changed(finished):
    """The tiny config changes these demo settings (model.image_size 64 is the model's own; out and
    threads describe the machine); a fashion-less machine's demo trains digits second, same list."""
    import tasks

    sequence = tasks.resolve_sequence(load_config().sequence)  # the demo's tasks as this machine resolves them
    expected = [("tasks", list(sequence.tasks), ["digits", "faces"]),
                ("eval_only", [n for n in sequence.eval_only if n not in sequence.tasks], ["photo_patches"]),
                ("train.batch_size", 64, 16), ("train.epochs", 3, 1), ("train.max_train_per_class", 450, 16),
                ("train.warmup_steps", 20, 2), ("eval.probe_max_per_class", 100, 12),
                ("eval.test_max_per_class", None, 10)]
    for strategy in ("ft", "ldifs"):
        found = json.loads((finished / f"{strategy}-s0/deviations.json").read_text())
        assert [(d["key"], d["protocol"], d["run"]) for d in found] == expected
        assert "protocol demo, 8 changes: tasks [" in (finished / f"{strategy}-s0/log.txt").read_text()


def test_command_line_settings_reach_config_yaml(finished):
    for strategy in ("ft", "ldifs"):
        written = yaml.safe_load((finished / f"{strategy}-s0/config.yaml").read_text())
        assert written["train"]["warmup_steps"] == 2 and written["threads"] == THREADS
        assert written["train"]["batch_size"] == 16  # the file's settings stay


def test_pretrained_row_shared_between_strategies(finished):
    a = Matrix.load(finished / "ft-s0/matrices/lp.csv").values[0]
    b = Matrix.load(finished / "ldifs-s0/matrices/lp.csv").values[0]
    assert a == b


def test_metrics_json_round_trips_through_cli(finished, capsys):
    run = finished / "ldifs-s0"
    stored = json.loads((run / "metrics.json").read_text())
    assert main(["metrics", str(run / "matrices/lp.csv"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == stored["lp"]
    assert "no zero-shot" in stored["notes"][0]


def test_heatmaps_are_real_pictures(finished):
    for png in (finished / "ft-s0").glob("heatmap_*.png"):
        img = np.asarray(Image.open(png).convert("L"), dtype=float)
        assert img.shape[0] > 150 and img.shape[1] > 300
        assert img.std() > 10  # not blank


def test_compare_table_has_one_row_per_run(finished, tmp_path, capsys):
    assert main(["compare", str(finished / "ft-s0"), str(finished / "ldifs-s0"), "--out", str(tmp_path)]) == 0
    lines = (tmp_path / "comparison.md").read_text().strip().splitlines()
    assert len(lines) == 4 and "| ft-s0 | ft | demo + 8 changes |" in lines[2]
    assert "| ldifs-s0 | ldifs | demo + 8 changes |" in lines[3]
    csv_rows = (tmp_path / "comparison.csv").read_text().strip().splitlines()
    assert len(csv_rows) == 3
    assert (tmp_path / "comparison.png").stat().st_size > 5000


def test_compare_counts_a_folder_named_twice_once(finished, tmp_path):
    """The same run by two paths is one run (issue 33: it was grouped as two seeds, std 0)."""
    run = finished / "ft-s0"
    assert main(["compare", str(run), str(finished / ".." / finished.name / "ft-s0"), "--out", str(tmp_path)]) == 0
    assert len((tmp_path / "comparison.md").read_text().strip().splitlines()) == 3
    assert not (tmp_path / "comparison_groups.md").exists()


def test_compare_takes_the_invocation_folder_the_run_printed(finished, tmp_path, capsys):
    """`results: FOLDER` is what a run prints; compare expands it to the runs inside, in name order."""
    assert main(["compare", str(finished), "--out", str(tmp_path)]) == 0
    lines = (tmp_path / "comparison.md").read_text().strip().splitlines()
    assert len(lines) == 4 and "| ft-s0 | ft |" in lines[2] and "| ldifs-s0 | ldifs |" in lines[3]
    capsys.readouterr()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["compare", str(empty)]) == 2
    assert "nor an invocation folder holding runs; pass the run folders" in capsys.readouterr().err


def test_a_finished_run_keeps_its_last_weights_alone_or_drops_them(finished, tmp_path, capsys):
    """checkpoints: last -- checkpoints/model.pt holds the final weights (those state.pt of the same
    run with checkpoints: keep holds) and nothing else; drop -- no checkpoint at all."""
    from benchmark.run.checkpoint import keep_finished_checkpoint

    cfg = tiny_config(tmp_path, {"strategies": ["ft", "ldifs"], "model": {"image_size": 64},
                                 "train": {"warmup_steps": 2}, "checkpoints": "last", "figures": False})
    run = run_strategy(cfg, "ft", tmp_path / "ft-s0")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["model.pt"]
    weights = torch.load(run / "checkpoints/model.pt", weights_only=True)
    kept = torch.load(finished / "ft-s0/checkpoints/state.pt", weights_only=True)["model"]
    assert weights.keys() == kept.keys() and all(torch.equal(weights[k], kept[k]) for k in kept)
    assert (run / "matrices/lp.csv").read_bytes() == (finished / "ft-s0/matrices/lp.csv").read_bytes()
    keep_finished_checkpoint(run, "drop", None)
    assert not (run / "checkpoints").exists()
    assert main(["run", "--resume", str(run)]) == 0 and "already finished" in capsys.readouterr().out


def test_resolved_config_reruns_as_is(finished):
    import strategies

    for name in ("ft", "ldifs"):
        written = yaml.safe_load((finished / f"{name}-s0/config.yaml").read_text())
        cfg = load_config(str(finished / f"{name}-s0/config.yaml"))
        assert cfg.strategies == [name] and cfg.tasks == ["digits", "faces"]
        assert cfg.model.image_size == 64 and cfg.eval_only == ["photo_patches"]
        for component, params in strategies.resolve_params(name, cfg.strategy_params).items():
            assert written["strategy_params"][component] == params  # every default written out
        assert cfg.to_dict() == written  # loading the written config gives back exactly what was written
    assert written["strategy_params"]["ldifs"]["alpha"] == 10000.0


def test_plot_redraws_from_csvs(finished, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(finished / "ft-s0" / "matrices", run / "matrices")
    assert main(["plot", str(run)]) == 0
    assert (run / "heatmap_lp.png").is_file() and (run / "heatmap_delta_lp.png").is_file()


def test_the_installed_entry_point_gives_one_line_and_exit_2(tmp_path):
    """The real process (tests/test_bad_input.py covers every command in-process)."""
    proc = subprocess.run([sys.executable, "-m", "benchmark", "run", "--strategy", "nope", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("cfbench: error: unknown strategy")
    assert not any(tmp_path.iterdir())


def test_list_commands(capsys):
    for what in ("tasks", "sequences", "strategies"):
        assert main(["list", what]) == 0
    out = capsys.readouterr().out
    assert "photo_patches" in out and "demo" in out and "ldifs" in out and "alpha=10.0" in out


@pytest.mark.parametrize("strategy", ["lpft", "l2sp", "ewc", "lwf", "wise-ft", "ldifs+ewc"])
def test_every_image_only_strategy_runs_on_the_offline_tasks(tmp_path, strategy):
    cfg = tiny_config(tmp_path, SMALL)
    run = run_strategy(cfg, strategy, tmp_path / strategy)
    lp = Matrix.load(run / "matrices/lp.csv")
    assert lp.rows == ["pretrained", "digits", "faces"]
    assert np.all((lp.array() >= 0) & (lp.array() <= 100))
    assert json.loads((run / "progress.json").read_text())["finished"]


@pytest.mark.parametrize("train_cap, probe_cap", [(4, 6), (6, 4)])
def test_an_lp_init_head_sees_only_the_images_its_task_trains_on(tmp_path, monkeypatch, train_cap, probe_cap):
    """LP-init fits on the round's probe images while the task trains on all of them (a smaller
    per-class cap keeps the first of the same seeded draw), else on the task's own training images:
    a 4-shot task's head is fitted on its 4 shots, not on the probe's 6."""
    import benchmark.run.runner as runner
    from tasks.registry import select

    fitted = []
    fit = runner.lp_init_weights
    monkeypatch.setattr(runner, "lp_init_weights", lambda s, work, *a: fitted.append(work.train_y.clone()) or
                        fit(s, work, *a))
    cfg = tiny_config(tmp_path, SMALL, {"eval_only": [], "train": {"max_train_per_class": train_cap},
                                        "eval": {"probe_max_per_class": probe_cap}})
    run_strategy(cfg, "ft", tmp_path / "run")
    shots = min(train_cap, probe_cap)
    for name, labels in zip(("digits", "faces"), fitted, strict=True):
        trained = load_split(name, "train", 32, None, train_cap, cfg.seed)
        assert torch.equal(labels, load_split(name, "train", 32, None, shots, cfg.seed).y), name
        assert len(labels) == shots * len(trained.y.unique())
    small, large = (set(select("digits", "train", None, cap, cfg.seed)[2]) for cap in (4, 6))
    assert small < large


@pytest.mark.parametrize("strategy", ["ewc", "lwf"])
def test_resume_restores_plugin_state_saved_as_plain_tensors(tmp_path, strategy):
    """EWC's ParamData and LwF's previous model go into state.pt as tensors and plain types
    (loaded with weights_only=True) and the resumed run equals the uninterrupted one."""
    cfg = tiny_config(tmp_path, SMALL, {"strategies": [strategy], "eval_only": []})
    full = run_strategy(cfg, strategy, tmp_path / "full")
    part = run_strategy(cfg, strategy, tmp_path / "part", stop_after=1)
    torch.load(part / "checkpoints" / "state.pt", weights_only=True)  # nothing but plain state
    assert_resumed_run_is_the_uninterrupted_one(full, part, "heads")  # every final weight and matrix


def test_resume_refuses_a_crafted_checkpoint_without_running_it(tiny_cfg, tmp_path, capsys):
    """A state.pt that would run code when unpickled (weights_only=False) is refused in one line."""
    part = run_strategy(tiny_cfg.replace(strategies=["ft"], eval_only=[]), "ft", tmp_path / "part", stop_after=1)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"completed": 1, "model": Payload()}, part / "checkpoints" / "state.pt")
    assert main(["run", "--resume", str(part)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cfbench: error:")]
    assert len(err) == 1 and "not a loadable cfbench checkpoint" in err[0]
    assert not marker.exists()
    (part / "checkpoints" / "state.pt").write_bytes(b"")  # empty / truncated: the same one line
    assert main(["run", "--resume", str(part)]) == 2


def test_non_finite_loss_stops_with_one_line_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    # an lr no config accepts (train.lr is at most 100), given to the second task behind the schema's back
    monkeypatch.setattr(TrainConfig, "lr_for", lambda self, task: 1.0e30 if task == "faces" else 1.0e-3)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"train": {"warmup_steps": 0, "max_train_per_class": 16},
                                   "eval": {"probe_max_per_class": 12, "test_max_per_class": 10}}))
    assert main(["run", str(cfg), "--tasks", "digits,faces", "--eval-only", "", "--strategy", "ft",
                 "--image-size", "32", "--epochs", "2", "--out", str(tmp_path / "out"), "--threads", str(THREADS)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cfbench: error:")]
    assert len(err) == 1 and "non-finite loss" in err[0] and "task faces" in err[0]
    run = next((tmp_path / "out").glob("*/ft-s0"))
    assert "non-finite loss" in (run / "log.txt").read_text()
    assert torch.load(run / "checkpoints" / "state.pt", weights_only=True)["completed"] == 1
    progress = json.loads((run / "progress.json").read_text())
    assert progress["completed_tasks"] == ["digits"] and progress["finished"] is False
    assert progress["error"] == err[0].removeprefix("cfbench: error: ")  # why it stopped, for users and sweeps
    assert not (run / "metrics.json").exists()


def test_metrics_json_is_strict_json(tmp_path, capsys):
    """A nan cell (numpy's savetxt writes missing values so) is blank and its metrics null, never
    NaN; an infinite cell is no accuracy: one line."""
    path = tmp_path / "m.csv"
    path.write_text("after,a,b\npretrained,50,50\na,-inf,60\nb,70,nan\n")
    assert main(["metrics", str(path), "--json"]) == 2
    assert "'-inf' is not an accuracy in [0, 100]" in capsys.readouterr().err
    path.write_text("after,a,b\npretrained,50,50\na,nan,60\nb,70,nan\n")
    assert main(["metrics", str(path), "--json"]) == 0
    out = capsys.readouterr().out
    assert "Infinity" not in out and "NaN" not in out
    json.loads(out, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


HEAVY = ("torch", "avalanche", "open_clip")


def test_everyday_commands_import_no_torch_avalanche_or_open_clip(finished, tmp_path):
    """`--help`, every listing, a refused config, `run --check` / `--print-config`, `data check`,
    `metrics` and `compare` answer without torch, Avalanche or open_clip (one fresh interpreter,
    the commands in turn; the first one that pulls a library in is named)."""
    run = finished / "ft-s0"
    commands = [["--help"], *(["list", w] for w in ("tasks", "sequences", "strategies", "protocols", "models",
                                                    "references")),
                ["run", "--strategy", "fx", "--check"], ["run", "--check", "--out", str(tmp_path / "out")],
                ["run", "--protocol", "ldifs", "--print-config"], ["data", "check"],
                ["data", "check", "--tasks", "digits,faces"], ["metrics", str(run / "matrices" / "lp.csv")],
                ["compare", str(run), "--out", str(tmp_path / "compared")]]
    code = ("import json, sys\nfrom benchmark.cli import main\nfound = []\n"
            f"for argv in {commands!r}:\n"
            "    try:\n        code = main(argv)\n    except SystemExit as exit:\n        code = exit.code\n"
            f"    found.append([argv, code, [m for m in {HEAVY!r} if m in sys.modules]])\n"
            "print(json.dumps(found), file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    results = json.loads(proc.stderr.strip().splitlines()[-1])
    assert [code for _, code, _ in results] == [0] * 7 + [2, 0, 2, 0, 0, 0, 0], results  # ldifs: no data here
    first = next(((argv, heavy) for argv, _, heavy in results if heavy), None)
    assert first is None, f"cfbench {' '.join(first[0])} imported {first[1]}"
    assert (tmp_path / "compared" / "comparison.md").is_file() and not (tmp_path / "out").exists()
