"""Reports: forgetting-first comparison, accuracy curves, LaTeX, trackers, non-interactive progress."""
import csv
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import yaml
from matplotlib.container import BarContainer, ErrorbarContainer

from benchmark.cli import main
from benchmark.evaluation.matrix import Matrix
from benchmark.evaluation.metrics import compute_metrics
from benchmark.files import atomic_write_json
from benchmark.report.compare import _matrices
from benchmark.report.figures import build_comparison, build_curves, describe_runs, group_runs
from benchmark.report.plots import DELTA_MAX, ECE_MAX, build_delta_heatmap, build_heatmap, plot_run
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
        dots = [c for c in right.containers if isinstance(c, ErrorbarContainer)][g_index]
        metrics = [compute_metrics(Matrix(["pretrained", "a", "b"], COLUMNS, TABLES[(strategy, s)].tolist()))
                   for s in (0, 1, 2)]
        np.testing.assert_allclose(dots.lines[0].get_ydata(),
                                   [np.mean([m[k] for m in metrics]) for k in ("avg", "last", "transfer")], atol=1e-9)


def test_curves_are_the_matrix_columns_after_each_task(tmp_path):
    _, groups = _groups(tmp_path)
    fig = build_curves(groups, "lp")
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["a (trained)", "b (trained)", "x (never trained)", "y (never trained)"]
    for j, ax in enumerate(panels):
        lines = [line for line in ax.get_lines() if line.get_linestyle() == "-"]
        for line, strategy in zip(lines, ("ft", "ldifs")):
            stack = np.stack([TABLES[(strategy, s)][:, j] for s in (0, 1, 2)])
            np.testing.assert_allclose(line.get_ydata(), stack.mean(axis=0), atol=1e-9)
        pretrained = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
        assert pretrained and pretrained[0].get_ydata()[0] == pytest.approx(
            np.mean([TABLES[("ft", s)][0, j] for s in (0, 1, 2)]))


def test_figures_say_what_they_show_on_fixed_scales(tmp_path):
    """Issue 34: titles name the run and strategy, heatmaps keep one colour scale per kind, curves
    share one y-range inside 0-100, the accuracy panel is zoomed and says so, and every comparison
    figure names the model, tasks, epochs and seeds."""
    runs, groups = _groups(tmp_path)
    close = Matrix(["pretrained", "a"], ["a", "x"], [[50.0, 94.4], [95.6, 94.9]])
    for kind, (vmin, vmax) in (("lp", (0, 100)), ("lp_ece", (0, ECE_MAX))):
        fig = build_heatmap(close, f"ft-s0 (ft): {kind}", kind)
        image = fig.axes[0].get_images()[0]
        assert (image.norm.vmin, image.norm.vmax) == (vmin, vmax) and fig.axes[0].get_title() == f"ft-s0 (ft): {kind}"
    delta = build_delta_heatmap(close, "change").axes[0].get_images()[0]
    assert (delta.norm.vmin, delta.norm.vmax) == (-DELTA_MAX, DELTA_MAX)
    plot_run(runs[0])
    titles = {p.name: p for p in runs[0].glob("heatmap_*.png")}
    assert set(titles) == {"heatmap_lp.png", "heatmap_delta_lp.png"}

    fig = build_curves(groups, "lp", caption="what ran")
    panels = [ax for ax in fig.axes if ax.get_visible()]
    lows, highs = zip(*(ax.get_ylim() for ax in panels))
    assert len(set(lows)) == len(set(highs)) == 1 and 0 <= lows[0] < highs[0] <= 100
    shown = np.concatenate([np.stack([TABLES[(s, seed)] for seed in (0, 1, 2)]).mean(axis=0).ravel()
                            for s in ("ft", "ldifs")])
    assert lows[0] <= shown.min() and shown.max() <= highs[0]
    assert all(ax.get_xlabel() == "after task" for ax in panels) and "what ran" in fig._suptitle.get_text()
    assert panels[2].get_facecolor() != panels[0].get_facecolor()  # never-trained panels shaded

    close_runs = [_fake_run(tmp_path / "close", s, 0) for s in ("ft", "ldifs")]
    loaded = [(r.name, yaml.safe_load((r / "config.yaml").read_text()), json.loads((r / "metrics.json").read_text()),
               _matrices(r)) for r in close_runs]
    loaded[0][2]["lp"].update(avg=94.4, last=95.0, transfer=94.8)  # an axis from 0 would hide 94.4 vs 95.6
    loaded[1][2]["lp"].update(avg=95.6, last=95.2, transfer=95.0)
    close_groups = group_runs(loaded)
    caption = describe_runs([cfg for _, cfg, _, _ in loaded], close_groups)
    assert caption == "model ? · a → b · epochs ? · 1 seed per strategy"  # what the fake configs say
    fig = build_comparison(close_groups, caption=caption)
    right = [ax for ax in fig.axes if ax.get_label() == "accuracy"][0]
    assert right.get_title() == "Avg, Last: trained tasks\nTransfer: tasks before their training"
    low, high = right.get_ylim()
    assert 90 < low < 94.4 and 95.6 < high < 100 and f"axis from {low:.0f}" in right.get_ylabel(), (low, high)
    assert caption in [t.get_text() for t in fig.texts]


def test_the_caption_names_model_tasks_epochs_and_seeds():
    cfg = {"model": {"name": "ViT-B-32", "pretrained": "openai"}, "tasks": ["cars", "dtd"], "eval_only": ["svhn"],
           "train": {"epochs": {"cars": 35, "dtd": 76}, "iterations": None}}
    groups = group_runs([(f"ft-s{seed}", {**cfg, "strategies": ["ft"], "seed": seed}, {}, {}) for seed in (0, 1, 2)])
    assert describe_runs([cfg] * 3, groups) == ("ViT-B-32 (openai) · cars → dtd (+ never trained: svhn) · "
                                                "epochs per task cars 35, dtd 76 · 3 seeds per strategy")
    local = {**cfg, "model": {"name": "ViT-B-32", "pretrained": "/w/ViT-B-32.pt"}, "train": {"epochs": 2}}
    assert describe_runs([local], groups[:1]).startswith("ViT-B-32 (ViT-B-32.pt) · cars → dtd")


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


def test_curves_during_fine_tuning_share_one_axis_and_mark_trained_panels():
    from benchmark.evaluation.within import Curve
    from benchmark.report.within import build_within

    curve = Curve(["a", "x"])
    for task, step, global_step, cells in (("pretrained", 0, 0, {"a": 40.0, "x": 90.0}),
                                           ("a", 5, 5, {"a": 80.0, "x": 89.3}), ("a", 10, 10, {"a": 85.0, "x": 88.6})):
        curve.add(task, step, global_step, cells)
    fig = build_within([("ft-s0 (ft)", curve)], "lp")
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["a (trained)", "x (never trained)"]
    assert panels[0].get_ylim() == panels[1].get_ylim() and 0 <= panels[0].get_ylim()[0] <= 40
    assert panels[0].get_ylim()[1] <= 100 and fig._suptitle.get_text().startswith("ft-s0 (ft): linear-probe")
