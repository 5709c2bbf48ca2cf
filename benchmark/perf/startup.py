"""How long the everyday commands take to answer, and which heavy libraries each imports.

    python -m benchmark.perf.startup [--repeats 5] [--run RUN_FOLDER] [--cwd CHECKOUT] [--json]

Each command runs in a fresh interpreter (`python -c`, `main([...])`), `--repeats` times; the
table gives the median wall seconds and the heavy libraries left in `sys.modules`. `metrics` and
`compare` need a finished run folder: `--run` names one, else a one-epoch `demo-small` run is made
in a temporary folder first (its time is not counted). `sweep --dry-run` lists a grid of 10,000
runs (the cap of one sweep: 2 strategies x 10 seeds x 10 weight decays x 50 learning rates). Ratios between two checkouts are only
meaningful from the same machine in the same minute: run both back to back (BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

HEAVY = ("torch", "avalanche", "open_clip", "timm", "sklearn", "matplotlib")
SMALL_RUN = ["run", "--sequence", "demo-small", "--eval-only", "", "--epochs", "1", "--image-size", "32",
             "--threads", "1"]
SMALL_CAPS = "train:\n  max_train_per_class: 8\neval:\n  probe_max_per_class: 8\n  test_max_per_class: 8\n"
GRID = {"name": "grid", "base": {"tasks": ["digits"], "eval_only": [], "model": {"image_size": 32}},
        "axes": {"strategies": ["ft", "l2sp"], "seeds": list(range(10)),
                 "train.weight_decay": [round(0.01 * i, 2) for i in range(10)],
                 "train.lr": [round(0.001 * i, 3) for i in range(1, 51)]}}


def commands(run: Optional[Path], grid: Optional[Path] = None) -> dict[str, list[str]]:
    """The commands a newcomer types first; `metrics` and `compare` read `run`; `grid`: a sweep file."""
    found = {
        "--help": ["--help"],
        "list strategies": ["list", "strategies"],
        "list tasks": ["list", "tasks"],
        "list models": ["list", "models"],
        "refused typo": ["run", "--strategy", "fx", "--check"],
        "run --check": ["run", "--check"],
        "run --print-config": ["run", "--print-config"],
        "data check": ["data", "check"],
    }
    if run is not None:
        found["metrics"] = ["metrics", str(next((run / "matrices").glob("*.csv")))]
        found["compare"] = ["compare", str(run), "--out", str(run.parent / "startup-compare")]
    if grid is not None:
        found["sweep --dry-run 10k"] = ["sweep", str(grid), "--dry-run", "--out", str(grid.parent / "sweeps")]
    return found


_PROBE = ("import json, sys, time\nstart = time.perf_counter()\nfrom benchmark.cli import main\n"
          "try:\n    code = main({argv!r})\nexcept SystemExit as exit:\n    code = exit.code\n"
          "print(json.dumps({{'seconds': time.perf_counter() - start, 'code': code, "
          "'heavy': [m for m in {heavy!r} if m in sys.modules]}}), file=sys.stderr)\n")


def measure(argv: list[str], repeats: int, cwd: Path) -> dict:
    """Median wall seconds of a fresh interpreter answering `cfbench ARGV`, and what it imported."""
    walls, probe = [], {}
    for _ in range(repeats):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", _PROBE.format(argv=argv, heavy=HEAVY)], cwd=cwd,
                              capture_output=True, text=True, timeout=600)
        walls.append(time.perf_counter() - start)
        probe = json.loads(done.stderr.strip().splitlines()[-1])
    return {"seconds": statistics.median(walls), "exit": probe["code"], "heavy": probe["heavy"]}


def small_run(folder: Path, cwd: Path) -> Path:
    """A finished one-epoch run of the offline demo-small sequence, for `metrics` and `compare`."""
    config = folder / "caps.yaml"
    config.write_text(SMALL_CAPS)
    subprocess.run([sys.executable, "-m", "benchmark", *SMALL_RUN[:1], str(config), *SMALL_RUN[1:],
                    "--out", str(folder / "results")], cwd=cwd, check=True, capture_output=True, timeout=900)
    return next((folder / "results").glob("*/ft-s0"))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--run", help="a finished run folder for metrics and compare (else one is made)")
    parser.add_argument("--cwd", default=".", help="the checkout to measure (default: this one)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    cwd = Path(args.cwd).resolve()
    with tempfile.TemporaryDirectory(prefix="cfbench-startup-") as tmp:
        run = Path(args.run) if args.run else small_run(Path(tmp), cwd)
        grid = Path(tmp) / "grid.yaml"
        grid.write_text(json.dumps(GRID))  # JSON is YAML
        results = {name: measure(cmd, args.repeats, cwd) for name, cmd in commands(run, grid).items()}
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"{'command':<20} {'median s':>9} {'exit':>5}  heavy modules imported")
    for name, r in results.items():
        print(f"{name:<20} {r['seconds']:>9.2f} {r['exit']!s:>5}  {', '.join(r['heavy']) or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
