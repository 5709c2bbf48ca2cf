"""The cost and the gain of one run over several processes: the same `cfbench run` in one process
and as N DDP ranks (`--nproc N`), alternated, each timed whole (wall clock, start-up included)
and by its training steps alone (rank 0's "train <task>: S steps in T s" lines).

    python -m benchmark.perf.ddp                          # CPU: 1 process vs 2 gloo ranks
    python -m benchmark.perf.ddp --device cuda --nproc 1,2,4,8 --model ViT-B-32 --pretrained openai

Prints one table, the ratios to the first --nproc measured in the same invocation (these machines
are noisy: compare ratios, not seconds across runs).
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRAIN_LINE = re.compile(r"train \S+: (\d+) steps in ([0-9.]+) s")


def one_run(nproc: int, args: argparse.Namespace, out: Path) -> tuple[float, float, int]:
    """(wall seconds, training seconds, training steps) of one `cfbench run`."""
    cmd = [sys.executable, "-m", "benchmark", "run", "--tasks", args.tasks, "--eval-only", "", "--epochs",
           str(args.epochs), "--device", args.device, "--out", str(out), *[f"--strategy={s}" for s in args.strategy]]
    cmd += ["--model", args.model] if args.model else []
    cmd += ["--pretrained", args.pretrained] if args.pretrained else []
    cmd += ["--nproc", str(nproc)] if nproc > 1 else ["--threads", str(args.threads)] if args.threads else []
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"cfbench run --nproc {nproc} failed:\n{done.stderr[-2000:]}")
    found = [(int(s), float(t)) for s, t in TRAIN_LINE.findall(done.stderr)]
    return wall, sum(t for _, t in found), sum(s for s, _ in found)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", default="1,2", help="comma-separated process counts; the first is the baseline")
    p.add_argument("--tasks", default="digits,faces")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--strategy", action="append", default=None, help="default: ft and ldifs")
    p.add_argument("--model")
    p.add_argument("--pretrained")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, help="torch threads of the 1-process run (default every core; "
                   "N ranks share the cores)")
    p.add_argument("--repeats", type=int, default=2, help="alternated rounds (median)")
    args = p.parse_args(argv)
    args.strategy = args.strategy or ["ft", "ldifs"]
    counts = [int(n) for n in args.nproc.split(",")]
    results: dict[int, list[tuple[float, float, int]]] = {n: [] for n in counts}
    with tempfile.TemporaryDirectory(prefix="cfbench-ddp-") as tmp:
        for r in range(args.repeats):
            for n in counts:
                results[n].append(one_run(n, args, Path(tmp) / f"r{r}-n{n}"))
    base_wall = statistics.median(w for w, _, _ in results[counts[0]])
    base_train = statistics.median(t for _, t, _ in results[counts[0]])
    print(f"cfbench run --tasks {args.tasks} --epochs {args.epochs} --strategy {','.join(args.strategy)} "
          f"--device {args.device}{' --model ' + args.model if args.model else ''}; median of {args.repeats}")
    print("| processes | wall s | wall / baseline | training s | training / baseline | steps |")
    print("|---|---|---|---|---|---|")
    for n in counts:
        wall = statistics.median(w for w, _, _ in results[n])
        train = statistics.median(t for _, t, _ in results[n])
        steps = results[n][0][2]
        print(f"| {n} | {wall:.1f} | {wall / base_wall:.2f} | {train:.1f} | {train / base_train:.2f} | {steps} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
