"""One rank of a sweep run that asked for several GPUs (resources.num_gpus: N): the worker's Ray
task launches N of these on its node with torch's elastic launcher (benchmark/run/launch.py),
each joining the process group and training the same run data-parallel; rank 0 writes it.

`python -m benchmark.sweep.ranks JOB.json` with JOB = {"config": the run's complete settings,
"run_dir": its folder, "resume": whether it continues from the folder's checkpoint}.
"""
from __future__ import annotations

import sys
from pathlib import Path

from ..config import resolve
from ..distributed import init_from_env, shutdown
from ..records import read_rank_job
from ..run.launch import die_with_launcher, record_rank_failure
from ..run.runner import run_strategy


def main(job_file: str) -> int:
    die_with_launcher()
    job = read_rank_job(Path(job_file))
    cfg = resolve(job["config"])
    try:
        init_from_env(cfg.device)
        run_strategy(cfg, cfg.strategies[0], Path(job["run_dir"]), resume=bool(job["resume"]))
        return 0
    except BaseException as err:  # the launcher reports it in one line; the worker records it
        record_rank_failure(err)
        return 1
    finally:
        shutdown()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
