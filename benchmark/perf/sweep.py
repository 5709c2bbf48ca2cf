"""Sweep overhead on one machine: `python -m benchmark.perf.sweep [--out DIR] [--runs-only]`.

The same 4 runs (FT and L2-SP x seeds 0 and 1, digits -> faces with photo_patches never trained,
EfficientNet-Lite0 at 64 px, capped so that one run takes about half a minute on 2 cores), timed
as whole commands in fresh processes, one after another:

1. `cfbench run` back to back, one invocation per run (4 processes);
2. `cfbench run` back to back, one invocation per seed with both strategies (2 processes: the
   cheapest way to get the 4 runs without a sweep);
3. `cfbench sweep --max-parallel 1` (Ray started inside, one run at a time with every core);
4. `cfbench sweep --max-parallel 2` (two runs at a time, each with half the cores);

plus Ray's own start-up (`ray.init` of an embedded cluster, and the first task's round trip,
which starts a worker process). Prints wall times and ratios, writes perf_sweep.json, and checks
that the runs of (3) have matrices byte-identical to those of (1) (same config, same threads).
A warm-up run fills the preprocessed-image cache first so that no variant pays for it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

BASE = {"tasks": ["digits", "faces"], "eval_only": ["photo_patches"],
        "train": {"epochs": 1, "max_train_per_class": 60, "batch_size": 32, "warmup_steps": 5},
        "eval": {"probe_max_per_class": 30, "test_max_per_class": 30}}
STRATEGIES, SEEDS = ("ft", "l2sp"), (0, 1)
RAY_STARTUP = """
import json, logging, time
t0 = time.monotonic()
import ray
t1 = time.monotonic()
logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
t2 = time.monotonic()
ray.get(ray.remote(lambda: 1).remote())
t3 = time.monotonic()
ray.get(ray.remote(lambda: 1).remote())
t4 = time.monotonic()
ray.shutdown()
t5 = time.monotonic()
print(json.dumps({"import_s": t1 - t0, "init_s": t2 - t1, "first_task_s": t3 - t2, "second_task_s": t4 - t3,
                  "shutdown_s": t5 - t4}))
"""


def _timed(cmd: list[str], log: Path) -> float:
    start = time.monotonic()
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        subprocess.run(cmd, check=True, stdout=fh, stderr=subprocess.STDOUT)
    return time.monotonic() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="working folder (default: a new temporary folder)")
    args = p.parse_args(argv)
    root = Path(args.out or tempfile.mkdtemp(prefix="perf-sweep-")).absolute()
    root.mkdir(parents=True, exist_ok=True)
    cfbench = [sys.executable, "-m", "benchmark"]
    threads = os.cpu_count() or 1
    log = root / "commands.log"
    (root / "base.yaml").write_text(yaml.safe_dump({**BASE, "threads": threads}))
    sweep_file = root / "perf.yaml"
    sweep_file.write_text(yaml.safe_dump({"name": "perf", "base_config": "base.yaml",
                                          "axes": {"strategies": list(STRATEGIES), "seeds": list(SEEDS)}}))
    print(f"working in {root}; {threads} CPUs; commands and their output in {log}", file=sys.stderr)
    _timed([*cfbench, "run", str(root / "base.yaml"), "--strategy", "ft", "--out", str(root / "warmup")], log)

    times: dict[str, float] = {}
    run_dirs: dict[str, Path] = {}
    out4 = root / "run-each"
    times["cfbench run x4 (one per run)"] = sum(
        _timed([*cfbench, "run", str(root / "base.yaml"), "--strategy", s, "--seed", str(seed), "--out",
                str(out4 / f"{s}-{seed}")], log) for s in STRATEGIES for seed in SEEDS)
    for s in STRATEGIES:
        for seed in SEEDS:
            run_dirs[f"{s}-s{seed}"] = next((out4 / f"{s}-{seed}").glob(f"*/{s}-s{seed}"))
    times["cfbench sweep --max-parallel 1"] = _timed(
        [*cfbench, "sweep", str(sweep_file), "--max-parallel", "1", "--out", str(root / "sweep1")], log)
    times["cfbench run x2 (one per seed)"] = sum(
        _timed([*cfbench, "run", str(root / "base.yaml"), "--strategy", ",".join(STRATEGIES), "--seed", str(seed),
                "--out", str(root / "run-seed" / str(seed))], log) for seed in SEEDS)
    times["cfbench sweep --max-parallel 2"] = _timed(
        [*cfbench, "sweep", str(sweep_file), "--max-parallel", "2", "--out", str(root / "sweep2")], log)
    startup = subprocess.run([sys.executable, "-c", RAY_STARTUP], check=True, capture_output=True, text=True)
    ray_times = json.loads(startup.stdout.strip().splitlines()[-1])

    identical = all((root / "sweep1/perf" / name / "matrices" / f).read_bytes() == (d / "matrices" / f).read_bytes()
                    for name, d in run_dirs.items() for f in ("lp.csv", "head.csv", "lp_ece.csv"))
    base4, base2 = times["cfbench run x4 (one per run)"], times["cfbench run x2 (one per seed)"]
    rows = [("variant", "wall s", "vs run x4", "vs run x2")]
    rows += [(k, f"{v:.1f}", f"{v / base4:.3f}", f"{v / base2:.3f}") for k, v in times.items()]
    print("| " + " | ".join(rows[0]) + " |\n|---|---|---|---|")
    print("\n".join("| " + " | ".join(r) + " |" for r in rows[1:]))
    print(f"Ray: import {ray_times['import_s']:.2f} s, ray.init (embedded, {threads} CPUs) "
          f"{ray_times['init_s']:.2f} s, "
          f"first task (starts a worker) {ray_times['first_task_s']:.2f} s, next task "
          f"{ray_times['second_task_s'] * 1000:.0f} ms, shutdown {ray_times['shutdown_s']:.2f} s")
    print(f"sweep --max-parallel 1 matrices byte-identical to cfbench run's: {identical}")
    (root / "perf_sweep.json").write_text(json.dumps({"wall_s": times, "ray": ray_times, "identical": identical,
                                                      "cpus": threads}, indent=2))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
