"""Generated folders (Hypothesis): every file kind cfbench reads back from a run folder --
progress.json, metrics.json, config.yaml, deviations.json, a matrix, a within-task curve,
checkpoints/state.pt -- mutated (a value of the wrong type, huge, negative, unicode or empty; a key
removed or added; the whole file replaced by another JSON value or by bytes) and fed through every
command that reads it: compare, plot, metrics and run --resume. Each outcome is exit 0 with a
complete result, or exit 2 with one `cfbench: error:` line, no traceback and nothing written (a
refused --resume may only rewrite the pid in an unfinished folder's existing .lock). `cfbench
sweep` of a finished sweep reads sweep.json, the reaper's records and each run's progress.json and
config.yaml (no Ray starts); a live sweep's run markers go through their reader. Derandomized: CI
sees the same examples every run."""
import contextlib
import csv
import io
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmark.cli import main
from benchmark.errors import CfbenchError
from benchmark.records import read_rank_job, read_reaper_record, read_run_marker
from tests.helpers import THREADS

EXAMPLES = settings(max_examples=30, deadline=None, database=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))
READ_BY = {"progress.json": ("compare", "resume"), "metrics.json": ("compare",), "deviations.json": ("compare",),
           "config.yaml": ("compare", "plot", "resume"), "matrices/lp.csv": ("compare", "plot", "metrics"),
           "matrices/within_lp.csv": ("compare", "plot"), "checkpoints/state.pt": ("resume",)}

leaves = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.integers(-2 ** 70, 2 ** 70),
    st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([-1.0, 0.0, 1e308, 100.5, -0.0]),
    st.text(max_size=6), st.sampled_from(["", "digits", "ü🙂", "../x", "pretrained", "ft", "after"]),
    st.lists(st.integers(-3, 3) | st.text(max_size=2), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(-3, 3), max_size=2))
mutations = st.one_of(
    st.tuples(st.just("replace"), st.integers(0, 10 ** 6), leaves),
    st.tuples(st.just("delete"), st.integers(0, 10 ** 6), st.none()),
    st.tuples(st.just("extra"), st.integers(0, 10 ** 6), leaves),
    st.tuples(st.just("whole"), st.just(0), leaves),
    st.tuples(st.just("bytes"), st.just(0), st.binary(max_size=24)))


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished tiny run (its checkpoint kept, within-task lp curves, no figures)."""
    root = tmp_path_factory.mktemp("finished")
    config = root / "c.yaml"
    config.write_text(yaml.safe_dump({
        "tasks": ["digits"], "eval_only": [], "strategies": ["ft"], "model": {"image_size": 32},
        "train": {"epochs": 1, "max_train_per_class": 4, "batch_size": 8},
        "eval": {"probe_max_per_class": 4, "test_max_per_class": 4, "within_task": {"points": 2, "kinds": ["lp"]}},
        "threads": THREADS, "figures": False}))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["run", str(config), "--out", str(root / "out")]) == 0
    (run,) = (root / "out").glob("*/ft-s0")
    assert all((run / kind).is_file() for kind in READ_BY), sorted(os.listdir(run / "matrices"))
    return run


def _paths(tree, prefix=()) -> list[tuple]:
    """Every key / index path in a parsed file, its root included."""
    found = [prefix]
    if isinstance(tree, dict):
        for k, v in tree.items():
            found += _paths(v, prefix + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            found += _paths(v, prefix + (i,))
    return found


def _mutated(tree, mutation):
    """The parsed file with one mutation; a path is drawn among all of its paths."""
    op, pick, value = mutation
    if op == "whole":
        return value
    paths = [p for p in _paths(tree) if p] or [()]
    path = paths[pick % len(paths)]
    if not path:
        return value
    node = tree
    for part in path[:-1]:
        node = node[part]
    last = path[-1]
    if op == "replace":
        node[last] = value
    elif op == "delete":
        del node[last]
    elif isinstance(node, dict):
        node[f"extra{pick % 7}"] = value
    else:
        node.append(value)
    return tree


def _write_mutated(path: Path, mutation) -> None:
    original = path.read_bytes()
    path.unlink()  # the folder is hard-linked to the fixture's: write a new file, never through the link
    op = mutation[0]
    if op == "bytes":
        path.write_bytes(mutation[2])
    elif path.suffix == ".json":
        path.write_text(json.dumps(_mutated(json.loads(original), mutation), default=str))
    elif path.suffix == ".yaml":
        path.write_text(yaml.safe_dump(_mutated(yaml.safe_load(original), mutation), allow_unicode=True))
    elif path.suffix == ".csv":
        rows = [list(r) for r in csv.reader(io.StringIO(original.decode()))]
        mutated = _mutated(rows, mutation if op != "whole" else ("replace", 0, mutation[2]))
        mutated = mutated if isinstance(mutated, list) else [[str(mutated)]]
        buf = io.StringIO()
        csv.writer(buf).writerows([r if isinstance(r, list) else [str(r)] for r in mutated])
        path.write_text(buf.getvalue())
    else:  # state.pt: the mutation on a top-level field or one of its direct entries
        state = torch.load(io.BytesIO(original), weights_only=True)
        shallow = {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v)
                   for k, v in state.items()}
        fields = [p for p in _paths(shallow) if 0 < len(p) <= 2]
        where = fields[mutation[1] % len(fields)]
        node = shallow if len(where) == 1 else shallow[where[0]]
        if op == "delete":
            del node[where[-1]]
        elif op == "extra" and isinstance(node, dict):
            node[f"extra_{where[-1]}"] = mutation[2]
        else:
            node[where[-1]] = mutation[2]
        torch.save(shallow, path)


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to, copy_function=os.link)
    return to


def _tree(root: Path) -> dict:
    return {p: p.read_bytes() if p.is_file() else None for p in root.rglob("*")}


def _changed(before: dict, after: dict) -> set:
    return {p for p in set(before) | set(after) if before.get(p, "absent") != after.get(p, "absent")}



def _argv(command: str, run: Path, out: Path) -> list[str]:
    return {"compare": ["compare", str(run), "--out", str(out)], "plot": ["plot", str(run)],
            "metrics": ["metrics", str(run / "matrices/lp.csv")], "resume": ["run", "--resume", str(run)]}[command]


def _complete(command: str, run: Path, out: Path, printed: str) -> bool:
    if command == "compare":
        return (out / "comparison.csv").is_file() and (out / "comparison.md").is_file()
    if command == "plot":
        return bool(printed.split()) and all(Path(p).is_file() for p in printed.split())
    if command == "metrics":
        return "avg" in printed.lower()
    progress = json.loads((run / "progress.json").read_text())
    return progress.get("finished") is True and (run / "metrics.json").is_file()


@EXAMPLES
@given(st.sampled_from(sorted(READ_BY)), mutations)
def test_any_file_read_back_from_a_run_folder_is_used_or_refused_in_one_line(finished, tmp_path_factory, kind,
                                                                              mutation):
    work = tmp_path_factory.mktemp("mutated")
    for command in READ_BY[kind]:
        run = _copy(finished, work / command / "ft-s0")
        if command == "resume" and kind != "progress.json":  # --resume reads the rest of an unfinished run
            (run / "progress.json").unlink()
            (run / "progress.json").write_text(json.dumps(
                {**json.loads((finished / "progress.json").read_text()), "finished": False}))
        _write_mutated(run / kind, mutation)
        out = work / command / "compared"
        before = _tree(work)
        err, printed = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(printed):
            try:
                rc = main(_argv(command, run, out))
            except SystemExit as exit_:
                rc = exit_.code
        lines = [line for line in err.getvalue().splitlines() if line.strip() and line.startswith("cfbench")]
        assert "Traceback" not in err.getvalue(), (kind, command, mutation, err.getvalue()[-1500:])
        assert rc in (0, 2), (kind, command, mutation, rc, err.getvalue()[-1500:])
        if rc == 2:
            assert len(lines) == 1 and lines[0].startswith("cfbench: error:"), (kind, command, err.getvalue())
            changed = _changed(before, _tree(work))
            if command == "resume" and (finished / ".lock").exists():
                changed.discard(run / ".lock")
            assert not changed, (kind, command, mutation, sorted(changed)[:3])
        else:
            assert _complete(command, run, out, printed.getvalue()), (kind, command, mutation)


MARKER = {"attempt": 1, "host": "h", "pid": 7, "started": 1.5}
RANK_JOB = {"config": {"tasks": ["digits"], "seed": 0}, "run_dir": "/x/ft-s0", "resume": False}
RECORD = {"driver": 7, "driver_started": 1.5, "token": "0" * 32, "processes": {"8": 2.5}}
SWEEP_READS = ("sweep.json", ".ray-processes-1.json", "ft-s0/progress.json", "ft-s0/config.yaml")


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory) -> tuple[Path, Path]:
    """(sweep file, its folder) of a one-run sweep whose run has finished: `cfbench sweep` on it
    reads everything back and starts no Ray."""
    from benchmark.run.runner import run_strategy
    from benchmark.sweep.config import load_sweep

    root = tmp_path_factory.mktemp("sweep")
    sweep = root / "s.yaml"
    sweep.write_text(yaml.safe_dump({"name": "s", "axes": {"seeds": [0]}, "base": {
        "tasks": ["digits"], "eval_only": [], "strategies": ["ft"], "model": {"image_size": 32}, "threads": THREADS,
        "train": {"epochs": 1, "max_train_per_class": 4, "batch_size": 8}, "figures": False,
        "eval": {"probe_max_per_class": 4, "test_max_per_class": 4}}}))
    plan = load_sweep(str(sweep), str(root / "out"))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        run_strategy(plan.runs[0].config, "ft", plan.folder / plan.runs[0].name)
        assert main(["sweep", str(sweep), "--out", str(root / "out")]) == 0
    (plan.folder / ".ray-processes-1.json").write_text(json.dumps(RECORD))  # a lost driver's: nothing left
    return sweep, plan.folder


@EXAMPLES
@given(st.sampled_from(SWEEP_READS), mutations)
def test_any_file_read_back_from_a_sweep_folder_is_used_or_refused_in_one_line(finished_sweep, tmp_path_factory,
                                                                                kind, mutation):
    """`cfbench sweep` of a finished sweep reads its sweep.json, the reaper's records and each run's
    progress.json and config.yaml (and starts no Ray): exit 0 with the comparison written, or exit 2
    with one line and nothing written (the sweep's .lock may take this pid)."""
    sweep, folder = finished_sweep
    out = tmp_path_factory.mktemp("sweeps")
    copy = _copy(folder, out / folder.name)
    _write_mutated(copy / kind, mutation)
    before = _tree(out)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(["sweep", str(sweep), "--out", str(out)])
        except SystemExit as exit_:
            rc = exit_.code
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    assert "Traceback" not in err.getvalue() and rc in (0, 2), (kind, mutation, rc, err.getvalue()[-1500:])
    if rc == 2:
        assert len(lines) == 1 and lines[0].startswith("cfbench: error:"), (kind, mutation, err.getvalue())
        changed = _changed(before, _tree(out)) - {copy / ".lock"}
        assert not changed, (kind, mutation, sorted(changed)[:3])
    else:
        assert (copy / "comparison.md").is_file() and json.loads((copy / "sweep.json").read_text())["runs"]


@EXAMPLES
@given(st.sampled_from(["marker", "record", "rank job"]), mutations)
def test_what_a_live_sweep_reads_is_read_or_refused_in_one_line(tmp_path_factory, kind, mutation):
    """A live sweep's run markers (read while runs are in flight), reaper records and the job file a
    run's DDP ranks read (sweep/ranks.py), through their readers: the value as written, or one
    CfbenchError line naming the file."""
    original, reader = {"marker": (MARKER, read_run_marker), "record": (RECORD, read_reaper_record),
                        "rank job": (RANK_JOB, read_rank_job)}[kind]
    path = tmp_path_factory.mktemp("live") / f"{kind}.json"
    path.write_text(json.dumps(original))
    _write_mutated(path, mutation)
    try:
        found = reader(path)
    except CfbenchError as err:
        assert "\n" not in str(err) and str(path) in str(err)
        return
    assert json.loads(path.read_text()) == found
