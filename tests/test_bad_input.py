"""Every command, given bad input: exit 2, one `cfbench: error:` line on stderr, no traceback and
no new file anywhere (the run folders, results/ and the cache stay as they were)."""
import json
import os

import pytest
import yaml

import tasks
from benchmark.cli import main

TINY = {"tasks": ["digits"], "eval_only": [], "strategies": ["ft"], "model": {"image_size": 32},
        "train": {"epochs": 1, "max_train_per_class": 4}, "eval": {"probe_max_per_class": 4}}


def _yaml(path, data) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _finished_run(folder, **broken):
    """A hand-made finished run folder (no training); `broken` replaces a file's text."""
    folder.mkdir(parents=True)
    (folder / "matrices").mkdir()
    files = {"config.yaml": yaml.safe_dump({**TINY, "protocol": "demo",
                                            "model": {"name": "efficientnet_lite0", "image_size": 32}}),
             "progress.json": json.dumps({"completed_tasks": ["digits"], "finished": True}),
             "metrics.json": json.dumps({"lp": {"avg": 50.0}}),
             "matrices/lp.csv": "after,digits\npretrained,10.0\ndigits,90.0\n"}
    for name, text in {**files, **broken}.items():
        if text is None:
            continue
        (folder / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(folder)


def _text(path, text) -> str:
    path.write_text(text)
    return str(path)


def _unfinished_run(folder, progress):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({**TINY, "protocol": "demo"}))
    (folder / "progress.json").write_text(progress)
    return str(folder)


def _cases(tmp, clip_path):
    """(id, argv[, a fragment of the line it must be refused with]) for every command; files are made
    here, inside tmp."""
    (tmp / "a_file").write_text("x")
    (tmp / "binary.csv").write_bytes(bytes(range(256)))
    (tmp / "latin1.yaml").write_bytes("tasks: [digits]\nname: caf\xe9\n".encode("latin-1"))
    (tmp / "list.yaml").write_text("- digits\n- faces\n")
    (tmp / "broken.yaml").write_text("tasks: [digits\n")
    tiny = _yaml(tmp / "tiny.yaml", TINY)
    bad = lambda name, change: _yaml(tmp / f"{name}.yaml", {**TINY, **change})  # noqa: E731
    cmp = lambda run: ["compare", run, "--out", str(tmp / "compared")]  # noqa: E731 -- not beside endless.yaml
    clip = lambda name, change: bad(name, {"model": {"name": "cfbench-tiny-vit", "pretrained": clip_path},  # noqa: E731
                                           **change})
    (tmp / "bomb.yaml").write_text('a: &a ["x","x","x","x","x","x","x","x","x"]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n'
                                   'c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n')
    (tmp / "huge.yaml").write_text("tasks: [digits]\n" + "# padding\n" * 1_000_000)
    (tmp / "endless.yaml").symlink_to("/dev/zero")
    (tmp / "garbage.pt").write_bytes(bytes(range(256)) * 4)
    in_run = os.path.join(_finished_run(tmp / "r8"), "nested")
    sweep = tmp / "twice.yaml"
    sweep.write_text(yaml.safe_dump({"name": "twice", "base": TINY, "axes": {"seeds": [0, 0]}}))
    return [
        ("run-missing-config", ["run", str(tmp / "missing.yaml")]),
        ("run-config-not-utf8", ["run", str(tmp / "latin1.yaml")]),
        ("run-config-not-mapping", ["run", str(tmp / "list.yaml")]),
        ("run-config-invalid-yaml", ["run", str(tmp / "broken.yaml")]),
        ("run-unknown-key", ["run", bad("unknown_key", {"epochs": 3})]),
        ("run-lr-not-number", ["run", bad("lr", {"train": {"lr": "fast"}})]),
        ("run-epochs-float", ["run", bad("epochs_float", {"train": {"epochs": 1.5}})]),
        ("run-strategies-not-list", ["run", bad("strategies", {"strategies": "ft"})]),
        ("run-seed-string", ["run", bad("seed", {"seed": "zero"})]),
        ("run-param-type", ["run", bad("param_type", {"strategies": ["ldifs"],
                                                      "strategy_params": {"ldifs": {"alpha": "big"}}})]),
        ("run-param-value", ["run", bad("param_value", {"strategies": ["ldifs"],
                                                        "strategy_params": {"ldifs": {"reference": "bogus"}}})]),
        ("run-zscl-param-value", ["run", bad("zscl_value", {
            "strategies": ["zscl"], "model": {"name": "cfbench-tiny-vit", "pretrained": clip_path},
            "strategy_params": {"zscl": {"avg_freq": 0}}})]),
        ("run-param-unknown", ["run", bad("param_unknown", {"strategy_params": {"ft": {"alpha": 1}}})]),
        ("run-unknown-strategy", ["run", tiny, "--strategy", "nope"]),
        ("run-text-strategy-without-text-tower", ["run", tiny, "--strategy", "zscl"]),
        ("run-unknown-task", ["run", tiny, "--tasks", "digits,unknown"]),
        ("run-empty-tasks", ["run", tiny, "--tasks", ""]),
        ("run-task-twice", ["run", tiny, "--tasks", "digits,digits"]),
        ("run-unknown-sequence", ["run", tiny, "--sequence", "nope"]),
        ("run-unknown-protocol", ["run", tiny, "--protocol", "nope"]),
        ("run-epochs-zero", ["run", tiny, "--epochs", "0"]),
        ("run-epochs-not-int", ["run", tiny, "--epochs", "two"]),
        ("run-image-size-tiny", ["run", tiny, "--image-size", "3"]),
        ("run-threads-zero", ["run", tiny, "--threads", "0"]),
        ("run-bad-device", ["run", tiny, "--device", "tpu"]),
        ("run-unknown-model", ["run", tiny, "--model", "no-such-model"]),
        ("run-pretrained-missing-file", ["run", tiny, "--pretrained", str(tmp / "weights.pt")]),
        ("run-pretrained-bad-tag", ["run", tiny, "--pretrained", "laion9000"]),
        ("run-out-is-a-file", ["run", tiny, "--out", str(tmp / "a_file")]),
        ("run-out-under-a-file", ["run", tiny, "--out", str(tmp / "a_file" / "results")]),
        ("run-cache-dir-is-a-file", ["run", tiny, "--cache-dir", str(tmp / "a_file")]),
        ("run-missing-data", ["run", tiny, "--tasks", "cifar10", "--data-root", str(tmp / "no-data")]),
        ("resume-not-a-run", ["run", "--resume", str(tmp)]),
        ("resume-missing-folder", ["run", "--resume", str(tmp / "nowhere")]),
        ("resume-corrupt-progress", ["run", "--resume", _unfinished_run(tmp / "corrupt-progress", "{oops")]),
        ("resume-checkpoint-gone", ["run", "--resume", _unfinished_run(
            tmp / "gone", json.dumps({"completed_tasks": ["digits"], "finished": False}))]),
        ("resume-with-ignored-flag", ["run", "--resume", _unfinished_run(
            tmp / "flags", json.dumps({"completed_tasks": [], "finished": False})), "--epochs", "5"]),
        ("metrics-missing", ["metrics", str(tmp / "none.csv")]),
        ("metrics-binary", ["metrics", str(tmp / "binary.csv")]),
        ("metrics-not-a-matrix", ["metrics", tiny]),
        ("compare-missing-folder", ["compare", str(tmp / "nowhere")]),
        ("compare-metrics-not-json", cmp(_finished_run(tmp / "r1", **{"metrics.json": "nan nan"})),
         'metrics.json: not valid JSON'),
        ("compare-progress-not-json", cmp(_finished_run(tmp / "r2", **{"progress.json": b"\x00\xff"})),
         'progress.json: not a UTF-8'),
        ("compare-config-missing", cmp(_finished_run(tmp / "r3", **{"config.yaml": None}))),
        ("compare-unfinished", cmp(_finished_run(tmp / "r4", **{
            "progress.json": '{"completed_tasks": [], "finished": false}'})),
         'not a finished run'),
        ("compare-out-is-a-file", ["compare", _finished_run(tmp / "r5"), "--out", str(tmp / "a_file")]),
        ("compare-bad-format", ["compare", _finished_run(tmp / "r6"), "--format", "bmp"]),
        ("compare-unknown-reference", [*cmp(_finished_run(tmp / "r10")), "--reference", "nope"], 'unknown reference'),
        ("compare-reference-as-a-path", [*cmp(_finished_run(tmp / "r11")), "--reference", "../protocols/demo"]),
        ("compare-metrics-kind-not-a-mapping", cmp(_finished_run(tmp / "r12", **{"metrics.json": '{"lp": 5}'})),
         "key 'lp' must be a mapping"),
        ("compare-strategies-not-names", cmp(_finished_run(tmp / "r13", **{
            "config.yaml": yaml.safe_dump({**TINY, "strategies": [[1, 2]]})})), "key 'strategies[0]' must be a string"),
        ("resume-finished-not-a-boolean", ["run", "--resume", _unfinished_run(
            tmp / "no-bool", json.dumps({"completed_tasks": [], "finished": "no"}))]),
        ("plot-nothing-to-draw", ["plot", _finished_run(tmp / "r14", **{"matrices/lp.csv": None})]),
        ("data-check-empty-tasks", ["data", "check", "--tasks", ""]),
        ("perf-threads-huge", ["perf", "--threads", "99999999999"]),
        ("perf-samples-huge", ["perf", "--samples", "99999999999"]),
        ("plot-not-a-run", ["plot", str(tmp)]),
        ("plot-corrupt-matrix", ["plot", _finished_run(tmp / "r7", **{"matrices/lp.csv": "after,a\nx,notanumber\n"})]),
        ("list-unknown", ["list", "everything"]),
        ("data-check-unknown-task", ["data", "check", "--tasks", "nope"]),
        ("data-check-bad-image-size", ["data", "check", "--tasks", "digits", "--sizes", "--image-size", "3"]),
        ("data-download-unknown-task", ["data", "download", "--tasks", "nope"]),
        ("data-download-no-downloader", ["data", "download", "--tasks", "imagenet", "--data-root", str(tmp)]),
        ("perf-repeats-zero", ["perf", "--repeats", "0"]),
        ("perf-batch-size-zero", ["perf", "--batch-size", "0"]),
        ("perf-unknown-model", ["perf", "--model", "nope"]),
        ("perf-zscl-without-text-tower", ["perf", "--zscl"]),
        ("no-command", []),
        # one row per class of the second reliability pass
        ("run-lr-nan", ["run", bad("lr_nan", {"train": {"lr": float("nan")}})]),
        ("run-lr-astronomical", ["run", bad("lr_huge", {"train": {"lr": 1.0e30}})]),
        ("run-seed-too-big", ["run", bad("seed_big", {"seed": 2 ** 70})]),
        ("run-threads-too-many", ["run", tiny, "--threads", "100000"]),
        ("run-iterations-infinite", ["run", bad("iterations_inf", {"train": {"iterations": float("inf")}})]),
        ("run-label-smoothing-nan", ["run", bad("ls_nan", {"train": {"label_smoothing": float("nan")}})]),
        ("run-cache-budget-infinite", ["run", bad("budget_inf", {"cache_budget_gb": float("inf")})]),
        ("run-negative-strategy-weight", ["run", bad("alpha_neg", {"strategies": ["ldifs"],
                                                                   "strategy_params": {"ldifs": {"alpha": -1.0}}})]),
        ("run-per-task-map-typo", ["run", bad("lr_typo", {"train": {"lr": {"digit": 0.1, "default": 1.0e-3}}})]),
        ("run-strategy-twice", ["run", bad("strategy_twice", {"strategies": ["ft", "ft"]})]),
        ("run-eval-only-twice", ["run", bad("eval_twice", {"eval_only": ["faces", "faces"]})]),
        ("run-out-inside-a-run-folder", ["run", tiny, "--out", in_run]),
        ("run-templates-file-missing", ["run", bad("templates", {"eval": {"templates": str(tmp / "none.yaml")}})]),
        ("run-classnames-file-binary", ["run", bad("classnames", {"eval": {"classnames": str(tmp / "binary.csv")}})]),
        ("run-captions-file-missing", ["run", bad("captions", {
            "strategies": ["zscl"], "model": {"name": "cfbench-tiny-vit", "pretrained": clip_path},
            "strategy_params": {"zscl": {"reference_texts": str(tmp / "captions.txt")}}})]),
        ("run-setting-unknown", ["run", tiny, "train.lrr=1"]),
        ("run-setting-twice", ["run", tiny, "seed=1", "seed=2"]),
        ("run-setting-wrong-type", ["run", tiny, "train.epochs=fast"]),
        ("run-setting-inside-a-per-task-map", ["run", tiny, "train.epochs.digits=2"]),
        ("run-setting-invalid-yaml", ["run", tiny, "train.lr=[1"]),
        ("run-setting-unknown-parameter", ["run", tiny, "strategy_params.ldifs.alpah=1"]),
        ("run-two-config-files", ["run", tiny, tiny]),
        ("run-pretrained-not-a-checkpoint", ["run", tiny, "--pretrained", str(tmp / "garbage.pt")]),
        ("run-check-pretrained-not-a-checkpoint", ["run", tiny, "--pretrained", str(tmp / "garbage.pt"), "--check"]),
        ("run-protocol-as-a-path", ["run", tiny, "--protocol", "../protocols/demo"]),
        ("run-config-alias-bomb", ["run", str(tmp / "bomb.yaml")]),
        ("run-config-too-big", ["run", str(tmp / "huge.yaml")]),
        ("run-config-endless-device", ["run", str(tmp / "endless.yaml")]),
        ("metrics-nan-cell", ["metrics", _text(tmp / "nan.csv", "after,a\npretrained,nan\n")]),
        ("metrics-cell-over-100", ["metrics", _text(tmp / "big.csv", "after,a\npretrained,1e300\n")]),
        ("metrics-column-twice", ["metrics", _text(tmp / "twice.csv", "after,a,a\npretrained,1,2\n")]),
        ("metrics-label-with-newline", ["metrics", _text(tmp / "newline.csv", 'after,"a\nb"\npretrained,1\n')]),
        ("metrics-field-over-csv-limit", ["metrics", _text(tmp / "field.csv", "after,a\npretrained," + "1" * 200_000)]),
        ("compare-metrics-nan-literal", cmp(_finished_run(tmp / "r9", **{"metrics.json": '{"lp": NaN}'})),
         'NaN is not JSON'),
        ("sweep-seed-twice", ["sweep", str(sweep), "--dry-run", "--out", str(tmp / "sweeps")]),
        # the third pass: checks that passed what the run refuses, inputs without bounds
        ("print-config-per-task-map-unknown-task", ["run", bad("epochs_digitz", {
            "train": {"epochs": {"digitz": 3, "default": 1}}}), "--print-config"], "'digitz', which is not a task"),
        ("run-check-nproc-not-data-parallel", ["run", clip("flyp_nproc", {"strategies": ["flyp"]}), "--check",
                                               "--nproc", "2"], 'flyp cannot train over 2 processes'),
        ("print-config-nproc-not-data-parallel", ["run", clip("flyp_nproc2", {"strategies": ["flyp"]}),
                                                  "--print-config", "--nproc", "2"],
         'flyp cannot train over 2 processes'),
        ("sweep-num-gpus-not-data-parallel", ["sweep", _yaml(tmp / "gpus.yaml", {
            "name": "gpus", "base": {**TINY, "model": {"name": "cfbench-tiny-vit", "pretrained": clip_path}},
            "resources": {"num_gpus": 2}, "axes": {"strategies": ["flyp"]}}), "--dry-run", "--out", str(tmp / "sw")],
         'flyp cannot train over 2 processes'),
        ("run-component-twice", ["run", tiny, "--strategy", "ldifs+ldifs"], 'names ldifs twice'),
        ("run-ls-with-label-smoothing", ["run", bad("ls_smoothing", {"strategies": ["ls"],
                                                                     "train": {"label_smoothing": 0.3}})],
         'is not used by ls'),
        ("run-routed-with-pretrained-zs", ["run", bad("routed_zs", {
            "strategies": ["diki"], "model": {"name": "cfbench-tiny-vit", "pretrained": clip_path},
            "eval": {"zs_text": "pretrained"}})],
         'routes each evaluation batch'),
        ("run-row-out-of-range", ["run", bad("row_lr", {"rows": {"ft": {"train": {"lr": -1.0}}}})], 'train.lr'),
        ("run-rows-not-a-mapping", ["run", bad("rows_bool", {"rows": True})], "'rows' must be a mapping"),
        ("run-template-second-field", ["run", bad("templates_field", {"eval": {"templates": _yaml(
            tmp / "two_fields.yaml", {"digits": ["a photo of the digit {} in {place}."]})}})], 'no other format field'),
        ("perf-projection-samples-huge", ["perf", "--projection", "demo", "--samples", "100000"],
         '--samples must be from 2'),
        ("perf-projection-samples-one", ["perf", "--projection", "demo", "--samples", "1", "--json"],
         '--samples must be from 2'),
        ("perf-projection-empty-name", ["perf", "--projection", ""], 'needs a protocol name'),
        ("run-empty-protocol", ["run", tiny, "--protocol", ""], "unknown protocol ''"),
        ("run-out-name-too-long", ["run", tiny, "--out", str(tmp / ("x" * 300))], 'longer than the file system allows'),
        ("compare-name-too-long", ["compare", str(tmp / ("x" * 300))], 'longer than the file system allows'),
        ("compare-out-name-too-long", ["compare", _finished_run(tmp / "r15"), "--out", str(tmp / ("y" * 300))],
         'longer than the file system allows'),
        ("run-cache-dir-in-proc", ["run", tiny, "--cache-dir", "/proc/cfbench-cache"], '/proc is not writable'),
        ("compare-progress-unknown-key", cmp(_finished_run(tmp / "r16", **{"progress.json": json.dumps(
            {"completed_tasks": ["digits"], "finished": True, "extra": 1})})), "unknown key 'extra'"),
        ("compare-deviations-not-changes", cmp(_finished_run(tmp / "r17", **{"deviations.json": "[1]"})),
         "deviations.json: key '[0]'"),
    ]


def _tree(*roots) -> set:
    return {os.path.join(d, f) for root in roots for d, dirs, files in os.walk(root) for f in files + dirs}


def test_every_command_refuses_bad_input_in_one_line_and_writes_nothing(tmp_path, monkeypatch, capfd,
                                                                        tiny_clip_checkpoint):
    (tmp_path / "in").mkdir()
    cases = _cases(tmp_path / "in", tiny_clip_checkpoint[0])
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # the default --out, results/, would appear here
    cache = os.environ["CFBENCH_CACHE"]
    before = _tree(tmp_path, cache)
    failures = []
    for case, argv, *reason in cases:  # a row may name the reason it must be refused for
        tasks.clear_memory()
        try:
            rc = main(argv)
        except SystemExit as exit_:  # argparse's own exit
            rc = exit_.code
        out, err = capfd.readouterr()
        lines = [line for line in err.splitlines() if line.strip()]
        ok = rc == 2 and len(lines) == 1 and lines[0].startswith("cfbench: error:") and "Traceback" not in err \
            and all(r in err for r in reason)
        new = _tree(tmp_path, cache) - before
        if not ok or new:
            failures.append(f"{case}: rc={rc} stderr={err.strip()[:300]!r} new files={sorted(new)[:3]}")
    assert not failures, "\n".join(failures)


def test_a_cache_folder_from_the_environment_is_checked_before_anything_is_written(tmp_path, monkeypatch, capfd):
    (tmp_path / "a_file").write_text("x")
    monkeypatch.setenv("CFBENCH_CACHE", str(tmp_path / "a_file"))
    assert main(["run", "--tasks", "digits", "--eval-only", "", "--strategy", "ft", "--out", str(tmp_path / "out")]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cfbench: error: $CFBENCH_CACHE") and "is a file" in err[0]
    assert sorted(os.listdir(tmp_path)) == ["a_file"]


@pytest.mark.parametrize("variables", [{"WORLD_SIZE": "2"}, {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_WORLD_SIZE": "0"},
                                       {"WORLD_SIZE": "two"}, {"WORLD_SIZE": "2", "RANK": "5", "LOCAL_RANK": "0",
                                                               "LOCAL_WORLD_SIZE": "2", "MASTER_PORT": "1"}])
def test_hand_set_rank_variables_are_one_line(tmp_path, monkeypatch, capfd, variables):
    """Rank variables set by hand, not by torchrun: one line naming the variable, nothing written."""
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    assert main(["run", _yaml(tmp_path / "tiny.yaml", TINY), "--out", str(tmp_path / "out")]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cfbench: error: $"), err
    assert sorted(os.listdir(tmp_path)) == ["tiny.yaml"]
