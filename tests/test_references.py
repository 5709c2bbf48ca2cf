"""Published numbers as data (benchmark/references/*.yaml): every shipped file loads and is
consistent, `cfbench list references`, and `cfbench compare --reference` on hand-made finished runs
prints published, measured and their difference, computed here by hand."""
import csv
import json

import numpy as np
import pytest
import yaml
from matplotlib.collections import PathCollection
from matplotlib.container import ErrorbarContainer

from benchmark.cli import main
from benchmark.config import list_protocols
from benchmark.errors import CfbenchError
from benchmark.evaluation.matrix import Matrix
from benchmark.evaluation.metrics import compute_metrics
from benchmark.report.compare import _matrices
from benchmark.report.figures import build_comparison, group_runs
from benchmark.report.references import (
    ACCURACY_KINDS, METRICS, REFERENCE_DIR, list_references, load_reference, parse_reference
)

ORDER1 = "zscl-table3-order1"


def test_every_shipped_reference_loads_and_names_what_cfbench_has():
    import strategies
    from tasks import SEQUENCES

    names = list_references()
    assert {ORDER1, "zscl-table3-order2"} <= set(names)
    for name in names:
        ref = load_reference(name)
        assert ref.name == name and ref.kind in ACCURACY_KINDS and ref.protocol in list_protocols()
        assert ref.datasets == tuple(SEQUENCES[ref.sequence].tasks), name
        assert len(ref.source["commit"]) == 40 and ref.checked and ref.paper and ref.table
        unknown = [r.strategy for r in ref.rows if r.strategy is not None and r.strategy not in strategies.STRATEGIES]
        assert not unknown, f"{name} maps rows to strategies cfbench does not have: {unknown}"


def test_the_zscl_rows_map_to_the_strategies_that_reproduce_them():
    ref = load_reference(ORDER1)
    assert {r.method: r.strategy for r in ref.rows} == {
        "Zero-shot": None, "Continual FT": "ft", "LwF": "lwf-clip", "iCaRL": "icarl", "LwF-VR": "lwf-vr",
        "WiSE-FT": "wise-ft", "ZSCL*": None, "ZSCL": "zscl"}
    zscl = ref.row_for("zscl")
    assert (zscl.metrics["transfer"].mean, zscl.metrics["avg"].mean, zscl.metrics["last"].mean) == (68.1, 75.4, 83.6)


@pytest.mark.parametrize("name", list_references())
def test_each_mean_is_the_mean_of_its_dataset_values_within_rounding(name):
    """Each mean is round(mean of unrounded values, 1) and each value is rounded to 0.1: the two
    roundings differ by at most 0.05 + 0.05."""
    ref = load_reference(name)
    for row in ref.rows:
        for key in METRICS:
            published = row.metrics[key]
            known = [v for v in published.datasets if v is not None]
            assert len(known) == len(ref.datasets) - (key == "transfer"), (name, row.method, key)
            assert abs(published.mean - np.mean(known)) <= 0.1 + 1e-9, (name, row.method, key)
            assert published.datasets[0] is not None or key == "transfer"


@pytest.mark.parametrize("name", [n for n in list_references() if load_reference(n).zero_shot])
def test_the_zero_shot_row_has_avg_equal_to_last(name):
    zero_shot = load_reference(name).zero_shot
    assert zero_shot.method == "Zero-shot" and zero_shot.strategy is None
    avg, last, transfer = (zero_shot.metrics[k] for k in ("avg", "last", "transfer"))
    assert avg == last
    assert transfer.datasets[0] is None and transfer.datasets[1:] == avg.datasets[1:]


def _notebook_statistics(arr: np.ndarray) -> tuple[float, float, float]:
    """ZSCL's mtil/results.ipynb cell 0, statistics() after its CIFAR10 deletion (commit b96e714),
    unrounded: arr is 11 x 11, rows after each task, no pretrained row."""
    avg = arr.mean(axis=0)
    last = np.array(arr[-1, :])
    transfer = np.array([np.mean([arr[j, i] for j in range(i)]) for i in range(1, 11)])
    return float(transfer.mean()), float(avg.mean()), float(last.mean())


def test_cfbench_metrics_are_the_notebooks_statistics():
    arr = np.random.default_rng(0).uniform(0, 100, size=(11, 11))
    names = list(load_reference(ORDER1).datasets)
    got = compute_metrics(Matrix(["pretrained", *names], names, [[50.0] * 11, *arr.tolist()]))
    assert (got["transfer"], got["avg"], got["last"]) == pytest.approx(_notebook_statistics(arr), abs=1e-12)


@pytest.mark.parametrize("change, message", [
    ({"kind": "zs_ece"}, "kind"),
    ({"colour": "red"}, "unknown key"),
    ({"datasets": ["a", "a"]}, "distinct"),
    ({"rows": [{"method": "FT", "strategy": "ft", "transfer": {"mean": 1.0, "datasets": [None, 1.0]},
                "avg": {"mean": 1.0, "datasets": [1.0, 2.0]}, "last": {"mean": 101.0, "datasets": [1.0, 1.0]}}]},
     r"last mean: expected an accuracy in \[0, 100\]"),
    ({"rows": [{"method": "FT", "strategy": "ft", "transfer": {"mean": 1.0, "datasets": [None]}}]}, "2 datasets"),
    ({"rows": [{"method": "FT", "strategy": "ft", "pretrained": True}]}, "a pretrained row has no strategy"),
])
def test_a_malformed_reference_is_one_clear_error(change, message):
    good = yaml.safe_load((REFERENCE_DIR / f"{ORDER1}.yaml").read_text())
    good["datasets"], good["rows"] = ["a", "b"], [
        {"method": "FT", "strategy": "ft", **{k: {"mean": 1.0, "datasets": [1.0, 1.0]} for k in METRICS}}]
    parse_reference(good, "x.yaml")
    with pytest.raises(CfbenchError, match=message):
        parse_reference({**good, **change}, "x.yaml")


@pytest.mark.parametrize("name", [n for n in list_references() if load_reference(n).matrix])
def test_a_reference_computed_from_its_source_matrix_is_cfbenchs_metrics_of_it(name):
    """MoE-Adapters(++)'s logs print a matrix, not metrics: every stored value (rounded to 0.01) is
    cfbench's compute_metrics / per-dataset definition of the stored matrix."""
    ref = load_reference(name)
    A = np.array(ref.matrix)
    assert A.shape == (len(ref.datasets), len(ref.datasets))
    matrix = Matrix(list(ref.datasets), list(ref.datasets), A.tolist())
    measured = compute_metrics(matrix)
    (row,) = ref.rows
    for key in METRICS:
        assert row.metrics[key].mean == pytest.approx(measured[key], abs=0.005), (name, key)
    per_dataset = {"transfer": [None] + [A[:j, j].mean() for j in range(1, len(A))], "avg": A.mean(axis=0),
                   "last": A[-1]}
    for key, values in per_dataset.items():
        for published, value in zip(row.metrics[key].datasets, values):
            assert (published is None) == (value is None)
            assert value is None or published == pytest.approx(value, abs=0.005), (name, key)


def test_moe_adapters_runs_are_compared_with_the_repositorys_moe_adapters_pp_log(tmp_path, capsys):
    """The MoE-Adapters(++) reference: a moe-adapters run set beside the log's metrics (the hand-made matrix
    of _fake_run: Transfer 40, Last 80, Avg 7480 / 121)."""
    run = _fake_run(tmp_path, "moe-adapters-s0", "moe-adapters", "mtil-order1")
    assert main(["compare", str(run), "--out", str(tmp_path / "cmp"), "--reference", "moe-adapters-pp-order1"]) == 0
    out = capsys.readouterr().out
    assert "| moe-adapters-s0 | moe-adapters | zscl-mtil | MoE-Adapters++ (repository log) | Transfer | 69.0 | " \
           "40.00 | -29.03 |" in out
    assert "| MoE-Adapters++ (repository log) | Last | 85.9 | 80.00 | -5.93 |" in out
    assert (tmp_path / "cmp" / "reference_moe-adapters-pp-order1.md").is_file()


def test_an_unknown_reference_lists_the_known_ones(capsys):
    with pytest.raises(CfbenchError, match=f"unknown reference 'nope'; known: .*{ORDER1}"):
        load_reference("nope")
    with pytest.raises(CfbenchError, match="unknown reference"):
        load_reference("../protocols/zscl-mtil")


def test_list_references(capsys):
    assert main(["list", "references"]) == 0
    out = capsys.readouterr().out
    assert f"{ORDER1}\n  Table 3 (MTIL, order I)" in out
    assert "protocol zscl-mtil, sequence mtil-order1, zs matrix; source Thunderbeee/ZSCL@b96e714" in out
    assert "zscl-table3-order2\n  Table 10 (MTIL, order II" in out
    assert "Zero-shot (the pretrained row), Continual FT (ft), LwF (lwf-clip), iCaRL (icarl)" in out
    assert "ZSCL* (-), ZSCL (zscl)" in out
    assert "moe-adapters-pp-fewshot-order2\n" in out and "MoE-Adapters++ (repository log) (moe-adapters)" in out
    assert "no published numbers (compare without --reference):\n" in out and "  diki: lloongx/DIKI (8ef89e7)" in out


# A hand-made zero-shot matrix: the pretrained row all 50; after task t, 80 on the tasks trained so
# far and 40 on the others. Transfer = 40 (every A[t, j] with t < j), Last = 80, and Avg over the
# 11 x 11 entries = (66 x 80 + 55 x 40) / 121 (66 entries on or below the diagonal).
def _fake_run(root, name, strategy, sequence, protocol="zscl-mtil"):
    from tasks import SEQUENCES

    tasks = list(SEQUENCES[sequence].tasks)
    values = [[50.0] * 11] + [[80.0 if j <= t else 40.0 for j in range(11)] for t in range(11)]
    run = root / name
    matrix = Matrix(["pretrained", *tasks], tasks, values)
    matrix.save(run / "matrices" / "zs.csv")
    (run / "metrics.json").write_text(json.dumps({"zs": compute_metrics(matrix)}))
    (run / "progress.json").write_text(json.dumps({"completed_tasks": tasks, "finished": True}))
    (run / "deviations.json").write_text("[]")
    (run / "config.yaml").write_text(yaml.safe_dump({"strategies": [strategy], "seed": 0, "protocol": protocol,
                                                     "sequence": sequence, "tasks": tasks, "out": str(root)}))
    return run


def test_compare_sets_runs_beside_the_published_numbers(tmp_path, capsys):
    runs = [_fake_run(tmp_path, "ft-s0", "ft", "mtil-order1"), _fake_run(tmp_path, "lwf-s0", "lwf", "mtil-order1"),
            _fake_run(tmp_path, "zscl-s0", "zscl", "mtil-order2")]
    out_dir = tmp_path / "cmp"
    assert main(["compare", *map(str, runs), "--out", str(out_dir), "--reference", ORDER1, "--latex"]) == 0
    out = capsys.readouterr().out.split(f"Beside the published numbers (reference_{ORDER1}.md):")[1]
    avg = (66 * 80 + 55 * 40) / 121
    # published (Table 3, Continual FT: 44.6 / 55.9 / 77.3; Zero-shot 69.4 / 65.3 / 65.3), measured, difference
    expected = [("ft-s0", "ft", "Continual FT", "Transfer", "44.6", 40.0),
                ("ft-s0", "ft", "Continual FT", "Avg", "55.9", avg),
                ("ft-s0", "ft", "Continual FT", "Last", "77.3", 80.0),
                ("ft-s0", "pretrained", "Zero-shot", "Transfer", "69.4", 50.0),
                ("ft-s0", "pretrained", "Zero-shot", "Avg", "65.3", 50.0),
                ("ft-s0", "pretrained", "Zero-shot", "Last", "65.3", 50.0)]
    for run, strategy, method, metric, published, measured in expected:
        line = (f"| {run} | {strategy} | zscl-mtil | {method} | {metric} | {published} | {measured:.2f} | "
                f"{measured - float(published):+.2f} |")
        assert line in out, line
    assert "| ft-s0 | ft | zscl-mtil | Continual FT | Avg | 55.9 | 61.82 | +5.92 |" in out  # 7480 / 121 = 61.818
    assert out.count("| pretrained |") == 3  # one pretrained row for the runs that share it
    # the runs that cannot be compared are named, never compared silently
    assert "warning: zscl-s0: trained mtil-order2 (cars, food101," in out and \
        f"not {ORDER1}'s sequence mtil-order1 (aircraft, caltech101," in out
    assert "warning: lwf-s0: strategy lwf has no published row in zscl-table3-order1" in out
    assert "| zscl-s0 |" not in out and "| lwf-s0 | lwf |" not in out
    with open(out_dir / f"reference_{ORDER1}.csv") as f:
        rows = list(csv.DictReader(f))
    ft_avg = next(r for r in rows if r["strategy"] == "ft" and r["metric"] == "Avg")
    assert float(ft_avg["published"]) == 55.9 and float(ft_avg["measured"]) == pytest.approx(avg, abs=1e-4)
    assert float(ft_avg["difference (measured - published)"]) == pytest.approx(avg - 55.9, abs=1e-4)
    assert "warning: zscl-s0" in (out_dir / f"reference_{ORDER1}.md").read_text()
    assert r"ft-s0 & ft & zscl-mtil & Continual FT & Transfer & 44.6 & 40.00 & -4.60 \\" in \
        (out_dir / f"reference_{ORDER1}.tex").read_text()
    assert (out_dir / f"reference_{ORDER1}.png").is_file()


def test_a_run_off_the_protocol_is_compared_with_a_warning(tmp_path, capsys):
    run = _fake_run(tmp_path, "ft-s0", "ft", "mtil-order1", protocol="demo")
    assert main(["compare", str(run), "--reference", ORDER1]) == 0
    out = capsys.readouterr().out
    assert "warning: ft-s0: protocol demo, not zscl-mtil as published" in out
    assert "| ft-s0 | ft | demo | Continual FT | Last | 77.3 | 80.00 | +2.70 |" in out


def test_the_figure_marks_the_published_value_on_its_bar(tmp_path):
    run = _fake_run(tmp_path, "ft-s0", "ft", "mtil-order1")
    groups = group_runs([(run.name, yaml.safe_load((run / "config.yaml").read_text()),
                          json.loads((run / "metrics.json").read_text()), _matrices(run))])
    fig = build_comparison(groups, "zs", published=[{"avg": 55.9, "last": 77.3, "transfer": 44.6}])
    right = [ax for ax in fig.axes if ax.get_label() == "accuracy"][0]
    marks, = [c for c in right.collections if isinstance(c, PathCollection) and c.get_label() == "published"]
    # one dot per metric (Avg, Last, Transfer at x = 0, 1, 2); the star sits at the published value
    assert marks.get_offsets().tolist() == [[0.0, 55.9], [1.0, 77.3], [2.0, 44.6]]
    dots, = [c for c in right.containers if isinstance(c, ErrorbarContainer)]
    assert list(dots.lines[0].get_ydata()) == pytest.approx([(66 * 80 + 55 * 40) / 121, 80.0, 40.0])
    low, high = right.get_ylim()
    assert low <= 40.0 and 80.0 <= high  # the zoomed axis keeps every dot and star
