"""Reports: forgetting-first comparison, accuracy curves, LaTeX, trackers, non-interactive progress."""
import csv
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import yaml
from matplotlib.container import BarContainer

from benchmark.cli import main
from benchmark.evaluation.matrix import Matrix
from benchmark.evaluation.metrics import compute_metrics
from benchmark.files import atomic_write_json
from benchmark.report.compare import _matrices
from benchmark.report.figures import build_comparison, build_curves, group_runs
from tests.helpers import THREADS

COLUMNS = ["a", "b", "x", "y"]  # trained a, b; never trained x, y
RNG = np.random.default_rng(0)
TABLES = {(s, seed): np.round(RNG.uniform(40, 95, size=(3, 4)), 2) for s in ("ft", "ldifs") for seed in (0, 1, 2)}


def _fake_run(root: Path, strategy: str, seed: int) -> Path:
    """A finished run folder as the runner writes it, with a known LP matrix."""
    run = root / f"{strategy}-s{seed}"
    values = TABLES[(strategy, seed)]
    matrix = Matrix(["pretrained", "a", "b"], COLUMNS, values.tolist())
    matrix.save(run / "matrices" / "lp.csv")
    atomic_write_json(run / "metrics.json", {"lp": compute_metrics(matrix)})
    atomic_write_json(run / "progress.json", {"completed_tasks": ["a", "b"], "finished": True})
    (run / "config.yaml").write_text(yaml.safe_dump({"strategies": [strategy], "seed": seed, "tasks": ["a", "b"],
                                                     "out": str(root)}))
    return run


def _groups(tmp_path):
    runs = [_fake_run(tmp_path, s, seed) for s in ("ft", "ldifs") for seed in (0, 1, 2)]
    loaded = [(r.name, yaml.safe_load((r / "config.yaml").read_text()), json.loads((r / "metrics.json").read_text()),
               _matrices(r)) for r in runs]
    return runs, group_runs(loaded)


def test_runs_differing_only_in_seed_are_one_group(tmp_path):
    _, groups = _groups(tmp_path)
    assert [(g.label, g.n, g.seeds) for g in groups] == [("ft", 3, [0, 1, 2]), ("ldifs", 3, [0, 1, 2])]


def test_forgetting_panel_draws_the_mean_change_and_its_std_over_seeds(tmp_path):
    _, groups = _groups(tmp_path)
    fig = build_comparison(groups)
    left, right = fig.axes[:2]
    assert left.get_ylim()[0] == -left.get_ylim()[1]  # zero at the centre
    bar_sets = lambda ax: [c for c in ax.containers if isinstance(c, BarContainer)]  # noqa: E731
    for g_index, strategy in enumerate(("ft", "ldifs")):
        delta = np.stack([TABLES[(strategy, s)][-1, 2:] - TABLES[(strategy, s)][0, 2:] for s in (0, 1, 2)])
        expected = np.concatenate([delta, delta.mean(axis=1, keepdims=True)], axis=1)  # x, y, mean
        bars = bar_sets(left)[g_index]
        heights = [p.get_height() for p in bars.patches]
        np.testing.assert_allclose(heights, expected.mean(axis=0), atol=1e-9)
        # error bar = sample std over the three seeds: the segment's half length
        segments = bars.errorbar.lines[2][0].get_segments()
        np.testing.assert_allclose([(s[1][1] - s[0][1]) / 2 for s in segments], expected.std(axis=0, ddof=1),
                                   atol=1e-9)
        acc = bar_sets(right)[g_index]
        metrics = [compute_metrics(Matrix(["pretrained", "a", "b"], COLUMNS, TABLES[(strategy, s)].tolist()))
                   for s in (0, 1, 2)]
        np.testing.assert_allclose([p.get_height() for p in acc.patches],
                                   [np.mean([m[k] for m in metrics]) for k in ("avg", "last", "transfer")], atol=1e-9)


def test_curves_are_the_matrix_columns_after_each_task(tmp_path):
    _, groups = _groups(tmp_path)
    fig = build_curves(groups, "lp")
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == COLUMNS
    for j, ax in enumerate(panels):
        lines = [line for line in ax.get_lines() if line.get_linestyle() == "-"]
        for line, strategy in zip(lines, ("ft", "ldifs")):
            stack = np.stack([TABLES[(strategy, s)][:, j] for s in (0, 1, 2)])
            np.testing.assert_allclose(line.get_ydata(), stack.mean(axis=0), atol=1e-9)
        pretrained = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
        assert pretrained and pretrained[0].get_ydata()[0] == pytest.approx(
            np.mean([TABLES[("ft", s)][0, j] for s in (0, 1, 2)]))


@pytest.mark.parametrize("fmt", ["pdf", "svg", "png"])
def test_compare_writes_vector_figures_and_latex_with_the_csv_numbers(tmp_path, fmt, capsys):
    runs, _ = _groups(tmp_path)
    out = tmp_path / "cmp"
    assert main(["compare", *map(str, runs), "--out", str(out), "--format", fmt, "--latex"]) == 0
    for name in ("comparison", "curves_lp"):
        data = (out / f"{name}.{fmt}").read_bytes()
        if fmt == "pdf":
            assert data.startswith(b"%PDF") and b"/Type /Page" in data and len(data) > 5000
        elif fmt == "svg":
            drawn = [e for e in ET.fromstring(data).iter() if e.tag.endswith(("path", "use"))]
            assert len(drawn) > 50
        else:
            from PIL import Image

            pixels = np.asarray(Image.open(out / f"{name}.png").convert("L"), dtype=float)
            assert pixels.std() > 10  # not blank
    rows = list(csv.reader((out / "comparison.csv").open()))
    tex = (out / "comparison.tex").read_text()
    body = [line for line in tex.splitlines() if line.endswith(r"\\") and not line.startswith("run")]
    assert tex.startswith(r"\begin{tabular}") and r"\toprule" in tex and r"\bottomrule" in tex
    assert len(body) == len(rows) - 1
    for line, row in zip(body, rows[1:]):
        cells = [c.strip() for c in line[:-2].split("&")]
        assert cells[0].replace(r"\_", "_") == row[0] and cells[1:3] == row[1:3]
        assert row[2] == "unknown (unchecked)"  # these folders have neither a protocol nor deviations.json
        for cell, value in zip(cells[3:], row[3:]):
            plain = re.sub(r"\\textbf\{(.*)\}", r"\1", cell)
            assert plain == ("--" if value == "" else f"{float(value):.2f}")
    header = rows[0]
    for j in range(3, len(header)):
        values = [float(r[j]) for r in rows[1:] if r[j]]
        if not values:
            continue
        best = min(values) if header[j] == "LP Forgetting" else max(values)
        bold = [re.sub(r"\\textbf\{(.*)\}", r"\1", c) for line in body
                for c in [[x.strip() for x in line[:-2].split("&")][j]] if c.startswith(r"\textbf")]
        assert bold and all(b == f"{best:.2f}" for b in bold), header[j]
    assert r"\toprule" in capsys.readouterr().out


def test_trackers_log_loss_penalty_lr_and_every_round(tmp_path, monkeypatch):
    """One tiny LDIFS run with every tracker: TensorBoard (read back with TensorBoard's reader),
    MLflow's local file store, W&B offline, the CSV; nothing touches the network."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"loggers": ["tensorboard", "mlflow", "wandb", "csv"],
                                   "train": {"max_train_per_class": 32},
                                   "eval": {"probe_max_per_class": 12, "test_max_per_class": 10}}))
    assert main(["run", str(cfg), "--tasks", "digits", "--eval-only", "faces", "--strategy", "ldifs",
                 "--image-size", "32", "--epochs", "1", "--out", str(tmp_path / "out"), "--threads", str(THREADS)]) == 0
    run = next((tmp_path / "out").glob("*/ldifs-s0"))
    lp = Matrix.load(run / "matrices" / "lp.csv")
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/penalty/LDIFSPlugin", "eval/lp/digits", "eval/lp/faces",
            "metrics/lp/avg"} <= tags
    assert len(acc.Scalars("train/loss")) == len(acc.Scalars("train/penalty/LDIFSPlugin")) > 1
    for j, name in enumerate(lp.columns):
        events = acc.Scalars(f"eval/lp/{name}")
        assert [e.step for e in events] == [0, 1]
        np.testing.assert_allclose([e.value for e in events], lp.array()[:, j], atol=6e-5)  # CSV: 4 decimals
    metrics = json.loads((run / "metrics.json").read_text())
    assert acc.Scalars("metrics/lp/avg")[0].value == pytest.approx(metrics["lp"]["avg"], abs=1e-4)
    import mlflow

    client = mlflow.tracking.MlflowClient((run / "mlruns").resolve().as_uri())
    found = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(found) == 1
    history = client.get_metric_history(found[0].info.run_id, "eval/lp/digits")
    np.testing.assert_allclose([m.value for m in sorted(history, key=lambda m: m.step)], lp.array()[:, 0], atol=6e-5)
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    rows = list(csv.DictReader((run / "tracker.csv").open()))
    assert {r["name"] for r in rows} >= {"train/loss", "train/penalty/LDIFSPlugin", "eval/lp/faces"}


def test_non_interactive_runs_print_one_line_per_stage(tmp_path, capfd):
    """stderr is captured at the file-descriptor level here, not a terminal (as in CI or nohup):
    no carriage-return bar updates, one line per finished stage."""
    cfg = tmp_path / "capped.yaml"
    cfg.write_text(yaml.safe_dump({"train": {"max_train_per_class": 16},
                                   "eval": {"probe_max_per_class": 12, "test_max_per_class": 10}}))
    assert main(["run", str(cfg), "--tasks", "digits", "--eval-only", "faces", "--strategy", "ft", "--image-size", "32",
                 "--epochs", "1", "--threads", str(THREADS), "--out", str(tmp_path / "out")]) == 0
    out, err = capfd.readouterr()
    assert "\r" not in out + err
    assert re.search(r"^train digits: \d+ steps in [\d.]+ s, loss [\d.]+$", err, re.M)
    assert re.search(r"^eval after digits: 2 datasets in [\d.]+ s$", err, re.M)
