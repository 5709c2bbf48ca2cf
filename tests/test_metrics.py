import json
import math

import pytest

from benchmark.cli import main
from benchmark.errors import CfbenchError
from benchmark.evaluation.matrix import Matrix
from benchmark.evaluation.metrics import compute_metrics

# rows: pretrained, after a, after b, after c; columns: a, b, c (trained) and x (eval-only)
CSV = """after,a,b,c,x
pretrained,50,40,30,60
a,90,45,35,58
b,80,85,40,55
c,70,75,95,50
"""


def test_metrics_by_hand_with_eval_only_column():
    m = compute_metrics(Matrix.from_csv_text(CSV))
    # A = [[90,45,35],[80,85,40],[70,75,95]]
    assert m["avg"] == pytest.approx((90 + 45 + 35 + 80 + 85 + 40 + 70 + 75 + 95) / 9)
    assert m["last"] == pytest.approx((70 + 75 + 95) / 3)
    # transfer: j=b -> mean(A[a,b]) = 45; j=c -> mean(35, 40) = 37.5
    assert m["transfer"] == pytest.approx((45 + 37.5) / 2)
    # bwt: (70-90) and (75-85)
    assert m["bwt"] == pytest.approx((-20 + -10) / 2)
    # forgetting: a: max(90,80)-70=20; b: max(45,85)-75=10
    assert m["forgetting"] == pytest.approx(15)
    # delta vs pretrained on the last row: a +20, b +35, c +65, x -10
    assert m["delta_untrained"] == pytest.approx(-10)
    assert m["delta_all"] == pytest.approx((20 + 35 + 65 - 10) / 4)


def test_metrics_without_pretrained_row_and_positional_columns():
    text = "after,task 1,task 2\nafter 1,80,20\nafter 2,60,90\n"
    m = compute_metrics(Matrix.from_csv_text(text))
    assert m["avg"] == pytest.approx(62.5)
    assert m["last"] == pytest.approx(75)
    assert m["transfer"] == pytest.approx(20)
    assert m["bwt"] == pytest.approx(-20)
    assert m["forgetting"] == pytest.approx(20)
    assert "delta_all" not in m


def test_head_matrix_blanks_are_ignored():
    text = "after,a,b\npretrained,,\na,90,\nb,80,70\n"
    m = compute_metrics(Matrix.from_csv_text(text))
    assert m["avg"] == pytest.approx((90 + 80 + 70) / 3)
    assert m["transfer"] is None
    assert m["bwt"] == pytest.approx(-10)
    assert m["delta_all"] is None


def test_single_task_matrix_has_the_metrics_one_row_defines():
    m = compute_metrics(Matrix.from_csv_text("after,a,b\npretrained,50,60\na,90,55\n"))
    assert m["avg"] == m["last"] == 90 and m["delta_untrained"] == -5 and m["delta_all"] == pytest.approx(17.5)
    assert m["bwt"] is None and m["forgetting"] is None and m["transfer"] is None


@pytest.mark.parametrize("text,needle", [
    ("after,a,b\na,1,2\nb,3\n", "cells"),
    ("after,a,b\na,1,x\nb,3,4\n", "not a number"),
    ("after,a,b\npretrained,1,2\n", "at least one trained-task row"),
])
def test_malformed_csv_is_rejected(text, needle):
    with pytest.raises(CfbenchError, match=needle):
        compute_metrics(Matrix.from_csv_text(text))


def test_cli_metrics_json(tmp_path, capsys):
    path = tmp_path / "lp.csv"
    path.write_text(CSV)
    assert main(["metrics", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"avg", "last", "transfer", "bwt", "forgetting", "delta_untrained", "delta_all"}
    assert out["bwt"] == pytest.approx(-15)


def test_cli_metrics_bad_file_is_one_line(tmp_path, capsys):
    path = tmp_path / "bad.csv"
    path.write_text("after,a,b\na,1,2\nb,3\n")
    assert main(["metrics", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cfbench: error:")


def test_matrix_csv_round_trip(tmp_path):
    m = Matrix(columns=["a", "b"])
    m.add_row("pretrained", {"a": 12.5, "b": None})
    m.add_row("a", {"a": 99.0, "b": 1.25})
    m.save(tmp_path / "m.csv")
    back = Matrix.load(tmp_path / "m.csv")
    assert back.rows == ["pretrained", "a"] and back.columns == ["a", "b"]
    assert back.values[0][0] == 12.5 and math.isnan(back.values[0][1]) and back.values[1] == [99.0, 1.25]
    assert [p.name for p in tmp_path.iterdir()] == ["m.csv"]  # no temporary file left behind
