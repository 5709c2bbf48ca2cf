"""`python -m benchmark.perf_cache`: the raw vs compact cache benchmark (benchmark/perf/cache.py),
kept at this path because BENCHMARKS.md and GPU-machine scripts call it so."""
from .perf.cache import main

if __name__ == "__main__":
    main()
