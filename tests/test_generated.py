"""Generated inputs (Hypothesis): any run config, strategy parameters, sweep file, matrix CSV or
JSON file a user can give ends in exit 0 or in exit 2 with one `cfbench: error:` line -- never a
traceback -- and nothing is written. Values are drawn at the schema's own keys (so that most
examples reach the range checks rather than stopping at an unknown key), mixed with the values
that broke earlier versions: NaN, infinities, integers too large for their type, wrong types,
nesting, repeated names. Derandomized: CI sees the same examples on every run."""
import contextlib
import io
import math
import os
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import strategies as strategy_registry
from benchmark.cli import main
from benchmark.config import RunConfig
from benchmark.errors import CfbenchError
from benchmark.evaluation.matrix import Matrix
from benchmark.files import parse_json

EXAMPLES = settings(max_examples=200, deadline=None, database=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))
TINY = {"tasks": ["digits"], "eval_only": [], "strategies": ["ft"], "model": {"image_size": 32},
        "train": {"epochs": 1, "max_train_per_class": 4}, "eval": {"probe_max_per_class": 4}}
NAMES = ["digits", "faces", "photo_patches", "cifar10", "default", "ft", "ldifs", "zscl", "ewc+lwf", "demo",
         "ldifs", "auto", "raw", "linear", "text", "official", "train", "trainval", "adamw", "../demo", "$(x)"]


def _leaves(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        out += _leaves(value, f"{prefix}{key}.") if isinstance(value, dict) and value else [prefix + key]
    return out


SCHEMA_KEYS = _leaves(RunConfig().to_dict()) + [
    f"strategy_params.{s.name}.{p}" for s in strategy_registry.STRATEGIES.values() for p in s.defaults] + [
    "train.lr.digits", "train.lr.default", "train.epochs.faces", "train.epochs.cifar1O", "model.bogus", "bogus"]

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-3, max_value=300), st.integers(min_value=-2 ** 70, max_value=2 ** 70),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 0.5, 1.0, -1.0, 1e-3, 1e30, 1e400]),
    st.text(max_size=8), st.sampled_from(NAMES))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.sampled_from(NAMES) | st.text(max_size=5), inner, max_size=3),
                      max_leaves=6)


def _put(tree: dict, dotted: str, value) -> dict:
    *parents, last = dotted.split(".")
    node = tree
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[last] = value
    return tree


def _layer(changes) -> dict:
    import copy

    layer = copy.deepcopy(TINY)
    for key, value in changes:
        _put(layer, key, value)
    return layer


def _tree(root: Path) -> set:
    return {os.path.join(d, f) for d, dirs, files in os.walk(root) for f in files + dirs}


def _exits_cleanly(argv: list[str], root: Path, keep: set) -> None:
    """main(argv) ends in 0, or in 2 with one error line; no file appears under root but `keep`."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(argv)
        except SystemExit as exit_:  # argparse
            rc = exit_.code
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    assert rc in (0, 2), (rc, err.getvalue()[-2000:])
    if rc == 2:
        assert len(lines) == 1 and lines[0].startswith("cfbench: error:"), err.getvalue()[-2000:]
    assert "Traceback" not in err.getvalue()
    assert _tree(root) - keep == set(), sorted(_tree(root) - keep)[:3]


@pytest.fixture
def work(tmp_path_factory) -> Path:
    """A folder of this test's own, kept over its examples (Hypothesis runs them in one call)."""
    return tmp_path_factory.mktemp("generated")


def _write(path: Path, data) -> set:
    try:
        path.write_text(yaml.safe_dump(data, allow_unicode=True))
    except yaml.YAMLError:  # a value YAML cannot represent: write its repr, which is a YAML string
        path.write_text(repr(data))
    return {str(path)}


@EXAMPLES
@given(st.lists(st.tuples(st.sampled_from(SCHEMA_KEYS), values), min_size=1, max_size=4))
def test_any_run_config_is_checked_in_one_line(work, changes):
    keep = _write(work / "config.yaml", _layer(changes))
    _exits_cleanly(["run", str(work / "config.yaml"), "--check", "--out", str(work / "out")], work, keep)


@EXAMPLES
@given(st.sampled_from(sorted(strategy_registry.STRATEGIES)),
       st.dictionaries(st.sampled_from(sorted({p for s in strategy_registry.STRATEGIES.values() for p in s.defaults})),
                       scalars, max_size=3))
def test_any_strategy_parameters_are_checked_in_one_line(work, strategy, params):
    try:
        resolved = strategy_registry.resolve_params(strategy, {strategy: params})
        strategy_registry.check_params(strategy, {strategy: params})
    except CfbenchError:
        return
    for name, given_params in resolved.items():  # accepted: finite, and inside what the spec allows
        spec = strategy_registry.STRATEGIES[name]
        for key, value in given_params.items():
            if isinstance(value, float):
                assert math.isfinite(value)
            if key in spec.allowed:
                assert spec.allowed[key].violation(value) is None


SWEEP_KEYS = ["name", "protocol", "base", "axes", "max_parallel", "max_retries", "resources", "resources.num_cpus",
              "resources.num_gpus", "axes.seeds", "axes.strategies", "axes.train.lr", "axes.sequences", "axes.models",
              "axes.strategy_params.ldifs.alpha", "base.train.epochs", "base.seed", "base_config", "bogus"]


@EXAMPLES
@given(st.lists(st.tuples(st.sampled_from(SWEEP_KEYS), values), min_size=1, max_size=4))
def test_any_sweep_file_is_checked_in_one_line(work, changes):
    sweep = {"name": "gen", "base": dict(TINY), "axes": {"strategies": ["ft"], "seeds": [0]}}
    for key, value in changes:
        if key.startswith("axes.") and key.count(".") > 1:  # a dotted axis name is one key
            if not isinstance(sweep.get("axes"), dict):
                sweep["axes"] = {}
            sweep["axes"][key.removeprefix("axes.")] = value
        else:
            _put(sweep, key, value)
    keep = _write(work / "sweep.yaml", sweep)
    _exits_cleanly(["sweep", str(work / "sweep.yaml"), "--dry-run", "--out", str(work / "out")], work, keep)


cells = st.one_of(st.just(""), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                  st.integers(-10, 1000).map(str), st.text(max_size=6), st.just("1e999"))
labels = st.one_of(st.sampled_from(["pretrained", "digits", "faces", "a$b", "x_{1}", ""]), st.text(max_size=6))


@EXAMPLES
@given(st.lists(labels, min_size=0, max_size=4), st.lists(st.tuples(labels, st.lists(cells, max_size=5)), max_size=4),
       st.booleans())
def test_any_matrix_csv_is_read_or_refused_in_one_line(work, header, rows, raw_text):
    import csv

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["after", *header])
    for label, row in rows:
        writer.writerow([label, *row])
    path = work / "matrix.csv"
    path.write_text(buf.getvalue() if not raw_text else buf.getvalue().replace(",", ";", 1), encoding="utf-8")
    _exits_cleanly(["metrics", str(path)], work, {str(path)})
    try:
        matrix = Matrix.load(path)
    except CfbenchError:
        return
    values = [v for row in matrix.values for v in row if not math.isnan(v)]
    assert all(0 <= v <= 100 for v in values)
    assert len(set(matrix.rows)) == len(matrix.rows) and len(set(matrix.columns)) == len(matrix.columns)


json_texts = st.one_of(
    st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
                 lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                 max_leaves=8).map(lambda v: __import__("json").dumps(v)),
    st.sampled_from(['{"lp": NaN}', '{"a": 1, "a": 2}', "[Infinity]", "-Infinity", "{", "", "\x00", '{"a": 1e999}',
                     "[" * 5000 + "]" * 5000]),
    st.text(max_size=20))


@EXAMPLES
@given(json_texts)
def test_any_json_text_is_parsed_strictly_or_refused_in_one_line(text):
    try:
        value = parse_json(text, "metrics.json")
    except CfbenchError as err:
        assert "\n" not in str(err)
        return
    encoded = __import__("json").dumps(value, allow_nan=False)  # what was accepted is strict JSON
    assert "NaN" not in encoded and "Infinity" not in encoded
