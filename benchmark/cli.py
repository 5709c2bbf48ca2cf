"""`cfbench` command line: run, sweep, list, data check, metrics, compare, plot."""
from __future__ import annotations

import argparse
import errno
import os
import shlex
import signal
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path
from typing import Optional

from .errors import CfbenchError, CfbenchProblems
from .limits import INT_MAX, THREADS_MAX

def _quiet_imports() -> None:
    warnings.filterwarnings("ignore", message=".*QP solver.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def _run_overrides(args) -> dict:
    """The command-line flags as the last config layer."""
    over: dict = {}
    if args.protocol is not None:
        over["protocol"] = args.protocol
    if args.strategy:
        over["strategies"] = [s for item in args.strategy for s in item.split(",") if s]
    if args.tasks is not None:
        from tasks import parse_task_list

        if not args.tasks.strip():
            raise CfbenchError("--tasks is empty; name at least one task (cfbench list tasks)")
        over["tasks"] = list(parse_task_list(args.tasks))
    if args.sequence:
        over["sequence"], over["tasks"] = args.sequence, None
    if args.eval_only is not None:
        from tasks import parse_task_list

        over["eval_only"] = list(parse_task_list(args.eval_only)) if args.eval_only else []
    model = {k: v for k, v in (("name", args.model), ("pretrained", args.pretrained),
                               ("image_size", args.image_size)) if v is not None}
    if model:
        over["model"] = model
    if args.epochs is not None:
        over["train"] = {"epochs": args.epochs}
    for key in ("data_root", "cache_dir", "cache_format", "out", "device", "seed", "threads"):
        if getattr(args, key) is not None:
            over[key] = getattr(args, key)
    return over


def _config_and_settings(items: list[str]) -> tuple[Optional[str], dict]:
    """`run [CONFIG] [KEY=VALUE ...]`: the config file (at most one) and the layer the settings make."""
    from .config.overrides import is_override, override_layer

    files = [item for item in items if not is_override(item) or Path(item).exists()]
    if len(files) > 1:
        raise CfbenchError(f"run takes one config file, not {len(files)} ({', '.join(files)}); settings are "
                           "KEY=VALUE with a dotted key, e.g. train.lr=1e-4")
    return (files[0] if files else None), override_layer([item for item in items if item not in files])


def cmd_run(args) -> int:
    from .config import dump_config, load_config, merge
    from .config.deviations import headline, protocol_deviations
    from .config.deviations import summary as protocol_summary
    from .config.protocols import protocol_description
    from .config.validate import check_run

    if args.resume:
        return _resume(Path(args.resume), args)
    if args.nproc:
        from .run.launch import launched

        if launched():
            raise CfbenchError("--nproc starts the processes itself; under torchrun leave it out")
    path, settings = _config_and_settings(args.config)
    cfg = load_config(path, merge(settings, _run_overrides(args)))  # the flags last
    if args.print_config:
        if cfg.protocol:  # what the preset reproduces, as comments: the output stays a config file
            print("\n".join(f"# {line}" for line in textwrap.wrap(protocol_description(cfg.protocol), 100)))
        print(dump_config(cfg), end="")
        found = protocol_deviations(cfg)  # after the config, as comments: the output stays a config file
        print("\n".join([f"# {headline(cfg, found)}" + (":" if found else "")] + [f"#   {d.describe()}" for d in found]))
        sys.stdout.flush()  # the config first, then what --check would refuse of it
    # nothing is written before every check passed; --print-config checks as --check does
    plan = check_run(cfg, load_checkpoint=args.check or args.print_config)
    if (args.check or args.print_config) and args.nproc and args.nproc > 1:
        from .run.launch import check_launch  # torch: how many GPUs there are

        check_launch(args.nproc, cfg.device, cfg.strategies, cfg.model)
    if args.print_config:
        return 0
    if args.check:
        for combo in cfg.strategies:
            print(f"[{combo}] {protocol_summary(cfg, protocol_deviations(cfg, [combo]))}")
        print(f"checked: trains {' -> '.join(plan.trained)}, evaluates also {', '.join(plan.eval_only) or 'nothing else'}"
              f"; {len(cfg.strategies)} run(s) into {cfg.out}; nothing was written")
        return 0
    return _train(args, cfg, plan)


def _train(args, cfg, plan) -> int:
    """The checked run: launched over --nproc processes, or trained here (torch and Avalanche
    are imported from here on)."""
    from .report.run_folder import new_invocation_folder
    from .run.launch import after_restart, broadcast, check_launch, invocation_folder, join_ranks, launch_ranks

    label = cfg.sequence if not cfg.tasks else "-".join(plan.trained)
    out_existed = Path(cfg.out).exists()
    if args.nproc and args.nproc > 1:  # this process launches the ranks and waits: it trains nothing itself
        check_launch(args.nproc, cfg.device, cfg.strategies, cfg.model)
        return launch_ranks(args.nproc, args.argv, args.max_restarts, new_invocation_folder(Path(cfg.out), label))
    from .config.deviations import protocol_deviations
    from .config.deviations import summary as protocol_summary
    from .report.compare import compare_runs
    from .run.runner import run_strategy
    ranks = join_ranks(cfg.device)
    if ranks.active:  # started by a raw torchrun: refused before the invocation folder exists
        check_launch(ranks.size, "cpu", cfg.strategies, cfg.model)
    invocation, given = invocation_folder(Path(cfg.out), label, ranks)
    run_dirs = []
    try:
        for combo in cfg.strategies:
            run_dir = invocation / f"{combo}-s{cfg.seed}"
            resume = broadcast(after_restart(run_dir) if ranks.writer else None)
            if resume == "finished":
                run_dirs.append(run_dir)
                continue
            line = (f"[{combo}] {protocol_summary(cfg, protocol_deviations(cfg, [combo]))}; training on "
                    f"{' -> '.join(plan.trained)}; run directory {run_dir}")
            start = time.time()
            run_dirs.append(_attributed(run_dir, run_strategy, cfg, combo, run_dir, resume=resume == "resume",
                                        plan=plan,
                                        on_start=lambda line=line: ranks.writer and print(line, file=sys.stderr)))
            if ranks.writer:
                print(f"[{combo}] finished in {time.time() - start:.0f} s", file=sys.stderr)
    except BaseException:
        if ranks.writer and not given and not any(invocation.iterdir()):
            # refused before its run folder existed: leave nothing behind
            invocation.rmdir()
            if not out_existed and not any(invocation.parent.iterdir()):
                invocation.parent.rmdir()
        raise
    if ranks.writer:
        print(compare_runs(run_dirs, invocation, figures=None))
        print(f"results: {invocation} (comparison.md, comparison.csv{', comparison.png' if cfg.figures else ''}, "
              "one folder per strategy)")
    return 0


def _resume(run_dir: Path, args) -> int:
    """Continue a run with its own config.yaml; flags that would change the experiment are refused."""
    from .config import MACHINE_SETTINGS, load_run_config
    from .config.validate import check_data
    from .records import progress_of
    from .report.run_folder import CHECKPOINT

    given = [f"--{k.replace('_', '-')}" for k, v in vars(args).items()
             if k not in ("command", "func", "resume", "argv", "nproc", "max_restarts", *MACHINE_SETTINGS)
             and v not in (None, False, [])]
    if given:
        raise CfbenchError(f"--resume continues with {run_dir / 'config.yaml'} as it is; {', '.join(given)} would "
                           f"be ignored (only {', '.join('--' + k.replace('_', '-') for k in MACHINE_SETTINGS)} may "
                           "change); start a new run to change settings")
    if not (run_dir / "config.yaml").is_file():
        raise CfbenchError(f"{run_dir}: no config.yaml, not a cfbench run directory")
    progress = progress_of(run_dir)
    if progress.get("finished"):
        print(f"{run_dir}: already finished; nothing to resume")
        return 0
    if not (run_dir / CHECKPOINT).is_file():
        done = progress.get("completed_tasks") or []
        if done:
            raise CfbenchError(f"{run_dir}: progress.json lists {len(done)} finished task(s) ({', '.join(map(str, done))}) "
                               f"but {CHECKPOINT} is gone, so they cannot be continued; start the run again")
        raise CfbenchError(f"{run_dir}: no checkpoint yet (no task finished); start the run again instead")
    machine = {k: getattr(args, k) for k in MACHINE_SETTINGS if getattr(args, k) is not None}
    cfg = load_run_config(run_dir / "config.yaml", machine)
    check_data(tuple(cfg.tasks or ()) + tuple(cfg.eval_only or ()), cfg.data_root)
    from .run.launch import check_launch, join_ranks, launch_ranks, launched  # trains from here: torch

    if args.nproc and args.nproc > 1:
        if launched():
            raise CfbenchError("--nproc starts the processes itself; under torchrun leave it out")
        check_launch(args.nproc, cfg.device, cfg.strategies, cfg.model)
        return launch_ranks(args.nproc, args.argv, args.max_restarts, run_dir.parent)
    from .run.runner import run_strategy
    ranks = join_ranks(cfg.device)
    _attributed(run_dir, run_strategy, cfg, cfg.strategies[0], run_dir, resume=True)
    if ranks.writer:
        print(f"finished {run_dir}")
        _finish_invocation(run_dir.parent)
    return 0


def _attributed(run_dir: Path, fn, *args, **kwargs):
    """fn(...), an interruption carrying the run folder it stopped (for the message that says
    whether and how to resume it)."""
    try:
        return fn(*args, **kwargs)
    except KeyboardInterrupt as err:
        err.run_dir = run_dir
        raise


def _finish_invocation(invocation: Path) -> None:
    """The invocation's comparison, once every run folder beside the resumed one has finished."""
    from .records import read_progress
    from .report.compare import compare_runs
    from .report.run_folder import PROGRESS

    runs = sorted(d for d in invocation.iterdir() if (d / "config.yaml").is_file() and (d / PROGRESS).is_file())
    waiting = [d.name for d in runs if not read_progress(d / PROGRESS).get("finished")]
    if waiting:
        print(f"{invocation}: comparison written once {', '.join(waiting)} finish (--resume each)")
        return
    print(compare_runs(runs, invocation, figures=None))
    print(f"results: {invocation} (comparison.md, comparison.csv, the figures unless the runs set figures: false)")


def cmd_list(args) -> int:
    if args.what == "tasks":
        from tasks import TASKS

        for t in TASKS.values():
            print(f"{t.name:<17} {t.num_classes:>4} classes  {t.sizes}\n{'':<17} source: {t.source}; licence: "
                  f"{t.license}\n{'':<17} splits: {t.splits}")
    elif args.what == "sequences":
        from tasks import SEQUENCES

        for s in SEQUENCES.values():
            print(f"{s.name:<12} trained: {', '.join(s.tasks)}; eval-only: {', '.join(s.eval_only) or '-'}")
            print(f"{'':<12} {s.description}")
    elif args.what == "strategies":
        import strategies

        for spec in strategies.STRATEGIES.values():
            params = ", ".join(f"{k}={v}" + (f" ({spec.allowed[k].describe()})" if k in spec.allowed else "")
                               for k, v in spec.defaults.items()) or "no parameters"
            needs = "  [needs a text tower: CLIP]" if spec.needs_text else ""
            print(f"{spec.name:<8} {spec.description}{needs}\n{'':<8} {params}")
            if spec.notes:
                print(f"{'':<8} note: {spec.notes}")
        from .config import list_protocols, protocol_settings

        for protocol in list_protocols():
            for name, params in (protocol_settings(protocol).get("strategy_params") or {}).items():
                print(f"protocol {protocol} sets {name}: " + ", ".join(f"{k}={v}" for k, v in params.items()))
        print("combine with +, e.g. --strategy ldifs+ewc")
    elif args.what == "protocols":
        from .config import DEFAULT_PROTOCOL, list_protocols

        for name, description in list_protocols().items():
            default = " (default)" if name == DEFAULT_PROTOCOL else ""
            print(f"{name}{default}\n  {description}")
        print("cfbench run --protocol NAME --print-config shows every resolved setting")
    elif args.what == "references":
        _list_references()
    else:
        from .models import OFFLINE_MODELS
        from .models.catalog import open_clip_configs

        for name, desc in OFFLINE_MODELS.items():
            print(f"{name:<20} {desc}")
        print("open_clip models (pretrained: a tag, which downloads, or a local checkpoint path):")
        print("  " + ", ".join(open_clip_configs()))
    return 0


def _list_references() -> None:
    from .report.references import UNPUBLISHED, list_references, load_reference

    for name in list_references():
        ref = load_reference(name)
        rows = ", ".join(f"{r.method} ({r.strategy or ('the pretrained row' if r.pretrained else '-')})"
                         for r in ref.rows)
        print(f"{ref.name}\n  {ref.table}\n  paper: {ref.paper}\n  protocol {ref.protocol}, sequence {ref.sequence}, "
              f"{ref.kind} matrix; source {ref.source['repository']}@{ref.source['commit'][:7]} {ref.source['file']}"
              f"\n  rows (cfbench strategy): {rows}")
    print("no published numbers (compare without --reference):")
    for strategy, why in UNPUBLISHED.items():
        print(f"  {strategy}: {why}")
    print("cfbench compare RUN... --reference NAME sets runs beside a reference's published numbers")


def cmd_data_check(args) -> int:
    from tasks import TASKS, loaded_task, parse_task_list, resolve_data_root, resolve_sequence, task_status
    from tasks.validate import deep_check

    if args.tasks is not None and not args.tasks.strip(", "):
        raise CfbenchError("--tasks is empty; name at least one task, or leave --tasks out to check every task")
    if args.sequence:
        seq = resolve_sequence(args.sequence, args.data_root)
        names = seq.tasks + seq.eval_only
    else:
        names = parse_task_list(args.tasks) if args.tasks else tuple(TASKS)
    print(f"data root: {resolve_data_root(args.data_root)}")
    print(f"{'task':<17} {'status':<11} {'train':>8} {'val':>7} {'test':>7} {'classes':>7}")
    unusable = []
    for name in names:
        status, detail, counts = task_status(name, args.data_root)
        problems = deep_check(name, loaded_task(name, args.data_root)) if status == "found" and args.deep else []
        if problems:  # one line per corrupt image, the first 20
            more = [f"... and {len(problems) - 20} more"] if len(problems) > 20 else []
            status, detail = "corrupt", "\n  ".join(problems[:20] + more)
        if status == "found":
            print(f"{name:<17} {status:<11} {counts['train']:>8} {counts['val']:>7} {counts['test']:>7} "
                  f"{TASKS[name].num_classes:>7}")
        else:
            unusable.append(name)
            print(f"{name:<17} {status:<11} {'-':>8} {'-':>7} {'-':>7} {TASKS[name].num_classes:>7}")
            print(f"  {detail}")
    print(f"{len(names) - len(unusable)} of {len(names)} tasks usable")
    if args.sizes and args.image_size < 8:
        raise CfbenchError(f"--image-size must be at least 8, not {args.image_size}")
    if args.sizes:
        _print_cache_sizes(names, set(unusable), args.image_size, args.data_root)
    requested = bool(args.tasks or args.sequence)
    return 1 if unusable and requested else 0


def _print_cache_sizes(names, unusable: set, image_size: int, data_root) -> None:
    """Each task's cache at `image_size`, measured from its files; a task whose data is not here is
    sized from its published split counts (raw exactly; compact JPEG needs the images)."""
    from tasks import get_task
    from tasks.base import published_counts
    from tasks.cache import JPEG_QUALITY
    from tasks.loading import cache_sizes

    print(f"\ncache at {image_size} px (every image of each task; nothing is built; "
          f"jpeg = q{JPEG_QUALITY}, estimated from 32 sampled images)")
    print(f"{'task':<17} {'images':>9} {'raw GB':>9} {'compact GB':>11}  compact form")
    images, raw, compact = 0, 0.0, 0.0
    for name in names:
        if name in unusable and not get_task(name).sizes:  # your own folder, not there: nothing to go by
            print(f"{name:<17} {'-':>9} {'-':>9} {'-':>11}  not here, and no published counts")
            continue
        if name in unusable:  # no files to measure: the published counts
            count = sum(published_counts(get_task(name)).values())
            print(f"{name:<17} {count:>9} {count * 3 * image_size ** 2 / 1e9:>9.3f} {'-':>11}  "
                  "published counts (data not here)")
            images, raw = images + count, raw + count * 3 * image_size ** 2
            continue
        size = cache_sizes(name, image_size, data_root)
        print(f"{name:<17} {size['images']:>9} {size['raw'] / 1e9:>9.3f} {size['compact'] / 1e9:>11.3f}  {size['form']}")
        images, raw, compact = images + size["images"], raw + size["raw"], compact + size["compact"]
    known = " (of the tasks here)" if unusable and len(unusable) < len(names) else ""
    print(f"{'total':<17} {images:>9} {raw / 1e9:>9.3f} "
          + (f"{compact / 1e9:>11.3f}{known}" if len(unusable) < len(names) else f"{'-':>11}"))
    if unusable:
        print("(published counts: the sizes each source publishes, for tasks whose data is not under the data root)")


def cmd_data_download(args) -> int:
    if args.model:
        from .models.weights import download_weights

        if args.tasks:
            raise CfbenchError("data download takes --tasks or --model, not both; run it once for each")
        print(f"{args.model} {args.pretrained}: {download_weights(args.model, args.pretrained)}")
        return 0
    if not args.tasks:
        raise CfbenchError("data download needs --tasks a,b (datasets) or --model M --pretrained TAG (weights)")
    from tasks import download_task, parse_task_list, resolve_data_root, task_status

    root = resolve_data_root(args.data_root)
    for name in parse_task_list(args.tasks):
        print(f"downloading {name} into {root} ...")
        download_task(name, args.data_root)
        status, detail, _ = task_status(name, args.data_root)
        print(f"{name}: {status}" + (f"; {detail}" if detail else ""))
        if status != "found":
            return 1
    return 0


def cmd_metrics(args) -> int:
    from .evaluation.matrix import Matrix
    from .evaluation.metrics import compute_metrics, metrics_table
    from .files import strict_json

    metrics = compute_metrics(Matrix.load(args.matrix))
    print(strict_json(metrics) if args.json else metrics_table(metrics))
    return 0


def cmd_compare(args) -> int:
    from .config.validate import check_writable_folder
    from .files import refuse_links
    from .report.compare import COMPARE_OUTPUTS, compare_runs
    from .report.run_folder import runs_of

    dirs = runs_of([Path(d) for d in args.run_dirs])
    out = Path(args.out) if args.out else dirs[0].parent
    check_writable_folder(out, "--out")
    ours = [p.name for p in out.iterdir() if p.name.startswith(COMPARE_OUTPUTS)] if out.is_dir() else []
    if ours:  # the entries compare writes, never through a link planted there (none: nothing to scan)
        refuse_links(out, "output folder", ours)
    print(compare_runs(dirs, out, args.format, args.latex, reference=args.reference))
    tex = ", comparison.tex" if args.latex else ""
    groups = ", comparison_groups.md/.csv and groups/ (seed groups: mean, std, n; mean heatmaps)" \
        if (out / "comparison_groups.csv").is_file() else ""
    ref = f", reference_{args.reference}.md/.csv/.{args.format} (published beside measured)" if args.reference else ""
    print(f"wrote {out / 'comparison.md'}, comparison.csv{tex}, comparison.{args.format} (forgetting | accuracy), "
          f"curves_<kind>.{args.format} (accuracy after each task){groups}{ref}")
    return 0


def cmd_plot(args) -> int:
    from .files import refuse_links
    from .report.plots import plot_run
    from .report.within import plot_within, read_curves

    run_dir = Path(args.run_dir)
    if not (run_dir / "matrices").is_dir():
        raise CfbenchError(f"{run_dir}: no matrices/ folder, not a cfbench run directory")
    refuse_links(run_dir, "run folder")
    curves = read_curves(run_dir)  # read before plot_run draws anything
    drawn = plot_run(run_dir, args.format) + plot_within(run_dir, args.format, curves)
    if not drawn:
        raise CfbenchError(f"{run_dir / 'matrices'}: no matrix with a row to draw (nothing was written)")
    for path in drawn:
        print(path)
    return 0


def _positive_int(text: str, least: int = 1, most: int = INT_MAX) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be at least {least}, not {value}")
    if value > most:
        raise argparse.ArgumentTypeError(f"must be at most {most:,}, not {value:,}")
    return value


def _threads(text: str) -> int:
    return _positive_int(text, most=THREADS_MAX)


def _count(text: str) -> int:
    return _positive_int(text, least=0)


PROJECTION_SAMPLES = (2, 4096)  # a probe fit needs two classes; the photos go to a temporary folder
PERF_SUITE_FLAGS = ("model", "repeats", "batch_size", "epochs", "no_eval", "augment", "zscl")


def cmd_perf(args) -> int:
    if args.projection is not None:
        return _perf_projection(args)
    if args.strategy or args.json:
        raise CfbenchError(f"perf: {'--strategy' if args.strategy else '--json'} goes with --projection PROTOCOL")
    from .config import ModelConfig
    from .models import check_model

    model = args.model or "efficientnet_lite0"
    check_model(ModelConfig(name=model, pretrained="package" if model == "efficientnet_lite0" else None))
    if args.zscl and model == "efficientnet_lite0":
        raise CfbenchError("perf --zscl needs an open_clip --model (ZSCL trains a text tower)")
    from .perf.bench import run_perf
    from .run.runner import select_device, set_threads

    set_threads(args.threads)
    print(run_perf(model, args.repeats or 3, select_device(args.device), args.samples or 640, args.batch_size or 64,
                   args.epochs or 3, not args.no_eval, args.augment, args.zscl))
    return 0


def _perf_projection(args) -> int:
    """`perf --projection PROTOCOL`: the protocol's wall time projected from rates measured here."""
    given = [f"--{k.replace('_', '-')}" for k in PERF_SUITE_FLAGS if getattr(args, k) not in (None, False)]
    if given:
        raise CfbenchError(f"perf --projection measures the protocol's own model and settings; {given[0]} does not "
                           "go with it (only --strategy, --samples, --device, --threads, --json)")
    from .files import strict_json
    from .perf.projection import run_projection
    from .run.runner import select_device, set_threads

    if not args.projection.strip():
        raise CfbenchError("perf --projection needs a protocol name (cfbench list protocols)")
    least, most = PROJECTION_SAMPLES
    if args.samples is not None and not least <= args.samples <= most:
        raise CfbenchError(f"perf --projection --samples must be from {least} to {most:,} (the photos written to a "
                           f"temporary folder and the features each rate is measured at), not {args.samples:,}")
    chosen = [s for item in args.strategy or [] for s in item.split(",") if s.strip()] or None
    device = select_device(args.device)
    set_threads(args.threads)
    result, table = run_projection(args.projection, chosen, args.samples or 64, device)
    print(strict_json(result, indent=2) if args.json else table)
    return 0


def cmd_sweep(args) -> int:
    """A grid of runs over Ray (benchmark/sweep/); Ctrl-C leaves every run resumable."""
    from .sweep.driver import run_sweep

    if args.max_parallel is not None and args.max_parallel < 1:
        raise CfbenchError(f"--max-parallel must be at least 1, not {args.max_parallel}")
    try:
        return run_sweep(args.sweep_file, args.ray, args.max_parallel, args.dry_run, args.out)
    except KeyboardInterrupt as err:
        from .report.run_folder import interruption_line

        print(f"cfbench: sweep {interruption_line(err)}; finished tasks are checkpointed, run the same command "
              "again to continue", file=sys.stderr)
        return _interruption_status(err)


def one_line(text: str) -> str:
    """The message as one line: a newline or control character in a user's value (a key, a file
    name) is shown escaped, never as a break."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class _Parser(argparse.ArgumentParser):
    """argparse's usage errors as the suite's one line (exit 2), pointing at --help."""

    def error(self, message: str):
        print(f"cfbench: error: {one_line(message)} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cfbench", description="Continual fine-tuning benchmark for foundation "
                                "image models: how much does fine-tuning forget, and which strategy prevents it?")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="fine-tune over a task sequence with one or more strategies")
    r.add_argument("config", nargs="*", metavar="[CONFIG] [KEY=VALUE ...]",
                   help="a YAML config, laid over its protocol's preset (default: the offline demo), then settings "
                        "by their dotted path, typed as YAML, as a sweep's axes name them (train.lr=1e-4 "
                        "strategy_params.ldifs.alpha=100 'train.epochs={mnist: 3, default: 1}'); the flags below "
                        "are laid over both")
    r.add_argument("--protocol", help="a named preset of every setting (cfbench list protocols; default demo); "
                   "the config file and flags override it key by key")
    r.add_argument("--print-config", action="store_true", help="print the fully resolved config as YAML, then "
                   "check it as --check does (exit 2 naming each problem) and exit")
    r.add_argument("--check", action="store_true", help="check everything a run checks before it starts (settings, "
                   "strategy parameters, data, model weights, folders, templates, class names) and exit; nothing "
                   "is written")
    r.add_argument("--strategy", action="append", help="strategy or combination (ft, ldifs, ldifs+ewc); repeatable")
    r.add_argument("--tasks", help="comma-separated trained tasks, in order")
    r.add_argument("--sequence", help="a named sequence (cfbench list sequences)")
    r.add_argument("--eval-only", help="comma-separated never-trained eval datasets ('' for none)")
    r.add_argument("--model", help="efficientnet_lite0 or an open_clip model name")
    r.add_argument("--pretrained", help="'package' (efficientnet_lite0), an open_clip tag, or a checkpoint path")
    r.add_argument("--image-size", type=int, help="input resolution in pixels")
    r.add_argument("--epochs", type=int, help="training epochs per task")
    r.add_argument("--data-root", help="folder holding the datasets (default $CFBENCH_DATA or ~/data); "
                   "`cfbench data check` shows the layout expected")
    r.add_argument("--cache-dir", help="preprocessed-image cache (default $CFBENCH_CACHE or ~/.cache/cfbench)")
    r.add_argument("--cache-format", choices=("auto", "raw", "compact"),
                   help="raw uint8 squares, compact (source pixels / JPEG, decoded per batch), or auto: raw while "
                   "the run's splits fit cache_budget_gb (default auto; `cfbench data check --sizes` shows both)")
    r.add_argument("--out", help="output folder (default results/)")
    r.add_argument("--device", choices=("auto", "cpu", "cuda"))
    r.add_argument("--seed", type=int)
    r.add_argument("--threads", type=int, help="torch threads (default: every core)")
    r.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last finished task")
    r.add_argument("--nproc", type=_positive_int, help="train the run data-parallel over N processes on this machine "
                   "(torch's elastic launcher, as torchrun --standalone; DDP over gloo on CPU, NCCL on GPUs: one "
                   "GPU each); the protocol's batch stays the global batch. README 'One run on several GPUs'")
    r.add_argument("--max-restarts", type=_count, default=0, metavar="K", help="with --nproc: when a rank fails, "
                   "restart every rank up to K times, each restart resuming the runs from their checkpoints "
                   "(torchrun's elastic restart; default 0)")
    r.set_defaults(func=cmd_run)
    ls = sub.add_parser("list", help="list tasks, sequences, strategies, models, protocols or references "
                        "(published numbers)")
    ls.add_argument("what", choices=("tasks", "sequences", "strategies", "models", "protocols", "references"))
    ls.set_defaults(func=cmd_list)
    d = sub.add_parser("data", help="data utilities")
    dsub = d.add_subparsers(dest="data_command", required=True)
    dc = dsub.add_parser("check", help="which tasks are usable: split sizes, or the layout expected and where to "
                         "get it, or what is wrong (absent image files, labels out of range, a class without "
                         "training images, checksums, archives to extract); exit 1 if a requested task is unusable")
    dc.add_argument("--data-root", help="default $CFBENCH_DATA or ~/data")
    dc.add_argument("--tasks", help="comma-separated task names (default: all, reported without failing)")
    dc.add_argument("--sequence", help="check the tasks of a named sequence")
    dc.add_argument("--sizes", action="store_true", help="also print, per usable task and in total, the images "
                    "and the raw and compact cache bytes at --image-size, before anything is built")
    dc.add_argument("--image-size", type=int, default=224, help="resolution for --sizes (default 224)")
    dc.add_argument("--deep", action="store_true", help="also decode every image of every split and name each "
                    "one that cannot be decoded (long on full datasets; the default checks open no image)")
    dc.set_defaults(func=cmd_data_check)
    dd = dsub.add_parser("download", help="download tasks whose sources allow it (torchvision's downloaders), "
                         "or a model's pretrained weights (--model)")
    dd.add_argument("--data-root", help="default $CFBENCH_DATA or ~/data")
    dd.add_argument("--tasks", help="comma-separated task names")
    dd.add_argument("--model", help="an open_clip model whose pretrained weights to fetch into the hub cache "
                    "(runs load cached weights only; `run --check` names any that are missing)")
    dd.add_argument("--pretrained", default="openai", help="the weights' open_clip tag (default openai; "
                    "`cfbench list models` lists them)")
    dd.set_defaults(func=cmd_data_download)
    m = sub.add_parser("metrics", help="forgetting metrics of an accuracy-matrix CSV")
    m.add_argument("matrix")
    m.add_argument("--json", action="store_true", help="print one JSON object")
    m.set_defaults(func=cmd_metrics)
    c = sub.add_parser("compare", help="compare finished runs: Markdown + CSV (+ LaTeX) table, forgetting | "
                       "accuracy figure, accuracy curves; runs differing only in seed are grouped (mean, std)")
    c.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="finished run folders, or an invocation folder "
                   "(the `results:` folder of `cfbench run`), which stands for the runs inside it")
    c.add_argument("--out", help="where to write comparison.* (default: the first run's parent)")
    c.add_argument("--format", choices=("png", "pdf", "svg"), default="png", help="figure format (pdf / svg: "
                   "vector, for papers; default png)")
    c.add_argument("--latex", action="store_true", help="also print and write comparison.tex: a booktabs table "
                   "of the CSV's numbers, best per column in bold")
    c.add_argument("--reference", metavar="NAME", help="set each run beside a paper's published Transfer / Avg / "
                   "Last (cfbench list references): published, measured, difference; reference_NAME.md/.csv "
                   "(.tex with --latex) and a figure with the published values marked")
    c.set_defaults(func=cmd_compare)
    pl = sub.add_parser("plot", help="redraw a run's heatmaps and accuracy curves from its CSVs")
    pl.add_argument("run_dir")
    pl.add_argument("--format", choices=("png", "pdf", "svg"), default="png",
                    help="also write the figures in this format (PNG is always written)")
    pl.set_defaults(func=cmd_plot)
    sw = sub.add_parser("sweep", help="a grid of runs (strategies x seeds x sequences x models x settings) over "
                        "Ray, retried from checkpoints, seeds aggregated (see README \"Sweeps\")")
    sw.add_argument("sweep_file", help="sweep YAML: base config + axes (benchmark/sweeps/example.yaml)")
    sw.add_argument("--ray", default="local", metavar="local|auto|ADDRESS",
                    help="local: an embedded Ray on this machine (default); auto: the running cluster "
                    "(`ray start --head`); or a cluster address")
    sw.add_argument("--max-parallel", type=int, help="runs at a time (default: the sweep file's, else one per "
                    "GPU, or one per node without GPUs)")
    sw.add_argument("--out", help="parent of the sweep folder <out>/<name>/ (default: the base config's out)")
    sw.add_argument("--dry-run", action="store_true", help="list the expanded runs and exit; nothing is written")
    sw.set_defaults(func=cmd_sweep)
    pf = sub.add_parser("perf", help="benchmark the suite against bare PyTorch (ratios, see BENCHMARKS.md), or "
                        "project a protocol's wall time on this device (--projection)")
    pf.add_argument("--projection", metavar="PROTOCOL", help="project PROTOCOL's wall time per task and in total "
                    "from the published split sizes and rates measured here (its model with random weights), "
                    "beside the official code's path emulated and measured on this device")
    pf.add_argument("--strategy", action="append", help="with --projection: strategies to project (default: the "
                    "protocol's); repeatable or comma-separated")
    pf.add_argument("--json", action="store_true", help="with --projection: print the projection as JSON")
    pf.add_argument("--model", help="efficientnet_lite0 (packaged weights, the default) or an open_clip name "
                    "(random weights)")
    pf.add_argument("--repeats", type=_positive_int, help="rounds of alternated variants (median; default 3)")
    pf.add_argument("--samples", type=_positive_int, help="training samples per epoch (default 640); with "
                    "--projection: the images (JPEG files) and, on a CPU, the batch and probe features every rate "
                    "is measured at, scaled by count (default 64, from 2 to 4096)")
    pf.add_argument("--batch-size", type=_positive_int, help="default 64")
    pf.add_argument("--epochs", type=_positive_int, help="epochs per timed task (the LDIFS cache amortizes; default 3)")
    pf.add_argument("--no-eval", action="store_true", help="skip the evaluation-round and probe comparisons")
    pf.add_argument("--augment", action="store_true", help="compare FT and LDIFS on RandomResizedCrop batches "
                    "(the ldifs protocol: LDIFS's reference runs on every batch) instead of the cache variants")
    pf.add_argument("--zscl", action="store_true", help="compare ZSCL with FT, both training text heads (the "
                    "zscl-mtil protocol's training); needs an open_clip --model")
    pf.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    pf.add_argument("--threads", type=_threads, help=f"torch threads, at most {THREADS_MAX} (default: every core)")
    pf.set_defaults(func=cmd_perf)
    return p


def _terminated(signum, frame) -> None:
    """SIGTERM (what SLURM, Ray and docker send) ends a run as Ctrl-C does: recorded, resumable."""
    err = KeyboardInterrupt()
    err.signal_name = "SIGTERM"
    raise err


def _dropped_interruption(unraisable) -> None:
    """sys.unraisablehook: a SIGTERM that lands while Python runs a weakref callback or a __del__ raises
    its KeyboardInterrupt there, where Python drops it (printing a traceback) and carries on. It is
    delivered again 10 ms later, outside (SIGALRM runs the same handler), as often as it is dropped."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt) and getattr(unraisable.exc_value, "signal_name", None):
        signal.setitimer(signal.ITIMER_REAL, 0.01)
        return
    sys.__unraisablehook__(unraisable)


def _interruption_status(err: KeyboardInterrupt) -> int:
    """The shell's convention: 128 + the signal's number (SIGTERM 15, SIGINT 2)."""
    return 143 if getattr(err, "signal_name", "") == "SIGTERM" else 130


def _interrupted(err: KeyboardInterrupt) -> int:
    from .report.run_folder import CHECKPOINT, interruption_line

    run_dir = getattr(err, "run_dir", None)
    if run_dir is None:
        hint = ""
    elif (run_dir / CHECKPOINT).is_file():
        hint = f"; finished tasks are checkpointed: continue with cfbench run --resume {shlex.quote(str(run_dir))}"
    else:
        hint = f"; no task of {run_dir} had finished, so there is nothing to resume: start the run again"
    print(f"cfbench: {interruption_line(err)}{hint}", file=sys.stderr)
    return _interruption_status(err)


def main(argv: Optional[list[str]] = None) -> int:
    _quiet_imports()
    args = _parse(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if in_main_thread else None
    if in_main_thread:
        previous_alarm, previous_hook = signal.signal(signal.SIGALRM, _terminated), sys.unraisablehook
        sys.unraisablehook = _dropped_interruption
    try:
        if os.environ.get("CFBENCH_LAUNCHED"):  # run/launch.py LAUNCHED_ENV, read without importing torch
            return _as_launched_rank(args)
        return args.func(args)
    except CfbenchProblems as err:
        print(f"cfbench: error: {len(err.lines)} problems:", file=sys.stderr)
        for line in err.lines:
            print(f"  - {one_line(line)}", file=sys.stderr)
        return 2
    except CfbenchError as err:
        print(f"cfbench: error: {one_line(str(err))}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into e.g. `head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as err:
        if err.errno != errno.ENAMETOOLONG:
            raise
        print(f"cfbench: error: {one_line(str(err.filename or ''))[:120]}...: a file or folder name is longer than "
              "the file system allows (255 bytes per name); choose a shorter one", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        return _interrupted(err)
    finally:
        if in_main_thread:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGTERM, previous)
            signal.signal(signal.SIGALRM, previous_alarm)
            sys.unraisablehook = previous_hook
        ranks = sys.modules.get("benchmark.distributed")  # imported whole: a process group may be open
        if ranks is not None and hasattr(ranks, "shutdown"):  # (never re-import torch after an interrupted import)
            ranks.shutdown()


def _parse(argv: Optional[list[str]]) -> argparse.Namespace:
    """The command line; `run`'s KEY=VALUE settings may also follow its flags (argparse takes a
    positional list once: `run CONFIG --seed 7 train.lr=1e-4` left train.lr=1e-4 unrecognized)."""
    parser = build_parser()
    args, stray = parser.parse_known_args(argv)
    if stray and args.command == "run" and not any(item.startswith("-") for item in stray):
        args.config += stray  # one config file at most, the rest settings: checked by _config_and_settings
    elif stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    return args


def _as_launched_rank(args) -> int:
    """A rank `--nproc` started: its error is recorded for the launcher, which prints the one line;
    stopped by the launcher (its peer failed), it leaves quietly."""
    from .run.launch import die_with_launcher, record_rank_failure

    die_with_launcher()
    try:
        return args.func(args)
    except KeyboardInterrupt as err:
        return _interruption_status(err)
    except BaseException as err:
        record_rank_failure(err)
        return 2 if isinstance(err, CfbenchError) else 1


if __name__ == "__main__":
    sys.exit(main())
