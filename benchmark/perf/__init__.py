"""The perf room: speed measured as ratios in one run (BENCHMARKS.md). The suite against a bare
PyTorch loop (bench.py: `cfbench perf`), the raw vs compact cache (cache.py, also
`python -m benchmark.perf_cache`; no Avalanche needed) and the sweep's overhead (sweep.py).
Nothing here is imported by a run."""
